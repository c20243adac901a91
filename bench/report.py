"""The markdown report: the targets of issue #5 with their verdicts, then one section per stage."""

from __future__ import annotations

from collections.abc import Callable


def _yes(ok: bool) -> str:
    return "met" if ok else "**MISSED**"


def targets(results: dict) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for every target of issue #5 whose stage ran."""
    rows = []
    for scale, pre in results.get("preprocess", {}).get("scales", {}).items():
        n = f"preprocess ({pre['images']} images, {scale})"
        ratio, speedup = pre["vs_bare"], pre["vs_seeds"]
        rows.append((f"{n} >= 0.85 x bare parallel loop", f"{ratio:.3f}", ratio >= 0.85))
        rows.append((f"{n} >= 1.8 x seeds' single loop", f"{speedup:.2f}x", speedup >= 1.8))
    for name, b in results.get("features", {}).get("backbones", {}).items():
        streaming = _ratio(b["streaming_ratio"])
        measured = f"{b['ratio']:.3f} (streaming {streaming}; CPU {b['cpu_ratio']:.3f})"
        rows.append((f"features {name} >= 0.90 x bare forward", measured, b["ratio"] >= 0.90))
        if "row_check" in b:
            check = b["row_check"]
            measured = f"{check['share']:.2%} ({check['check_s'] * 1000:.0f} ms)"
            target = f"features {name}: row-digest check < 2% of extraction"
            rows.append((target, measured, check["share"] < 0.02))
    for name, b in results.get("litert", {}).get("backbones", {}).items():
        target = 1.5 if name == "efficientnet_lite2_330" else 1.0
        rows.append(
            (
                f"LiteRT {name} @{b['input_size']} >= {target}x TensorFlow's bare forward",
                f"{b['speedup']:.2f}x",
                b["speedup"] >= target,
            )
        )
    points = results.get("scaling", {}).get("points", {})
    for stage in ("preprocess", "features") if points else ():
        small, large = _peak_mb(points["1N"][stage]), _peak_mb(points["4N"][stage])
        rows.append(
            (f"{stage} peak RSS 4N within 15% of N", f"{large / small:.3f}", large <= 1.15 * small)
        )
        a, b = _per_image(points["1N"], stage), _per_image(points["4N"], stage)
        rows.append((f"{stage} s/image 4N within 10% of N", f"{b / a:.3f}", b <= 1.10 * a))
    if points:
        peak = max(_peak_mb(point["preprocess"]) for point in points.values())
        rows.append(("preprocess peak RSS < 1.5 GB", f"{peak:.0f} MB", peak < 1536))
    sub = results.get("submission", {})
    if "warm_s" in sub:
        heavy = ", ".join(sub["warm_heavy_modules"]) or "none"
        measured = f"{sub['warm_s']:.2f} s; {sub['warm_pythons']} python; heavy imports: {heavy}"
        ok = sub["warm_s"] < 3 and not sub["warm_heavy_modules"] and sub["warm_up_to_date"]
        rows.append(("warm make submission < 3 s, no TensorFlow", measured, ok))
    return rows


def _peak_mb(result: dict) -> float:
    """The peak the targets use, on the safe side: the summed RSS of the stage's process tree
    (shared libraries counted once per process), or the largest single process when that is
    higher (sampling can miss a short spike)."""
    return max(result.get("tree_rss_mb", 0.0), result["rss_self_mb"], result["rss_children_mb"])


def _per_image(point: dict, stage: str) -> float:
    return point[stage]["seconds"] / point[stage]["images"]


def _table(header: str, rows: list[str]) -> list[str]:
    """Markdown table from 'a | b' strings."""
    width = header.count("|") + 1
    return [f"| {header} |", "|" + "---|" * width, *(f"| {row} |" for row in rows)]


def _preprocess_intro(r: dict) -> list[str]:
    """What the data sets are, and how much dearer the enlarged images are to decode."""
    text = (
        "All images of the data set (train + test; '1x'), and a set of k times as many "
        "symlinks to them ('kx'), on which fixed start-up costs weigh about as little as on the "
        "competition's 37,500 images."
    )
    scales = r["scales"]
    for name, p in scales.items():
        if "enlarged" not in p or "1x" not in scales:
            continue
        per_image = {k: scales[k]["cpu"]["bare"] / scales[k]["images"] for k in ("1x", name)}
        text += (
            f" Synthetic: the same images enlarged to {name}, the size of most competition "
            f"photos, saved as JPEG (quality {p['enlarged']['quality']}, "
            f"{p['enlarged']['mean_kb']:.0f} kB a file) in /tmp: the bare loop's CPU per image "
            f"is {per_image[name] / per_image['1x']:.1f}x that of the 200x200 sample, so "
            "writing each result weighs that much less against decoding it."
        )
    return [text + f" Output: {r['size']}x{r['size']}x3 uint8 per image.", ""]


def _section_preprocess(r: dict) -> list[str]:
    w = r["workers"]
    names = {
        "pipeline": (
            f"`arrays.preprocess`: {w} workers, one pwrite per row into the preallocated "
            ".npy, synced as tasks finish, fsync, rename"
        ),
        "bare": f"bare loop: imread, cvtColor, resize, result discarded; {w} processes",
        "bare_write": (
            f"bare loop + one pwrite per result into one preallocated file, "
            f"fsync at the end; {w} processes"
        ),
        "seeds": "seeds' loop: 1 process filling an in-RAM array",
    }
    rows, notes = [], []
    for scale, p in r["scales"].items():
        for key, name in names.items():
            runs = ", ".join(f"{s:.2f}" for s in p["runs"][key])
            ratio = p["rate"]["pipeline"] / p["rate"][key]
            rows.append(
                f"{p['images']} ({scale}) | {name} | {p['best'][key]:.2f} | "
                f"{p['rate'][key]:.0f} | {ratio:.3f} | {p['cpu'][key]:.2f} | {runs}"
            )
        notes.append(
            f"{p['images']} ({scale}): pipeline / bare parallel loop **{p['vs_bare']:.3f}**; / "
            f"bare loop that also writes **{p['vs_bare_write']:.3f}**; / seeds' single loop "
            f"**{p['vs_seeds']:.2f}x**."
        )
    header = (
        "images | variant | best s | images/s | pipeline / variant | CPU s (best run) | "
        "all runs (s)"
    )
    return [
        *_preprocess_intro(r),
        "Each variant in a fresh "
        "process, timed from the call (pool start-up included, interpreter start-up not); "
        "variants interleaved in rotating order, the best run counts; image files read once "
        "beforehand, so every variant finds them in the page cache, and `os.sync()` before "
        "each run, so none pays for writing back the previous run's output. Pools fork, as the "
        "pipeline's does. CPU s: user + system time of the process and its workers, which the "
        "load of a shared machine barely changes.",
        "",
        *_table(header, rows),
        "",
        *[f"- {note}" for note in notes],
    ]


def _section_features(r: dict) -> list[str]:
    rows = []
    for name, b in r["backbones"].items():
        runs = ", ".join(
            f"{p:.1f}/{q:.1f}" for p, q in zip(b["pipeline_runs_s"], b["bare_runs_s"])
        )
        rows.append(
            f"{name} | {b['images']} | {b['pipeline_rate']:.1f} | {b['bare_rate']:.1f} | "
            f"**{b['ratio']:.3f}** | {_ratio(b['streaming_ratio'])} | {b['cpu_ratio']:.3f} | "
            f"{b['fixed_s']:.1f} | {runs}"
        )
    header = (
        "backbone | images | pipeline img/s | bare img/s | pipeline / bare | streaming / bare | "
        "CPU | fixed s | runs: pipeline/bare s"
    )
    return [
        *_intro_features(r),
        "",
        *_table(header, rows),
        *_row_check_lines(r),
    ]


def _row_check_lines(r: dict) -> list[str]:
    """The row-digest check's cost beside the extraction it is part of (issue 23)."""
    rows = []
    for name, b in r["backbones"].items():
        if "row_check" not in b:
            continue
        c = b["row_check"]
        per_row = c["check_s"] / c["rows"] * 1e6
        crc = c["crc32_s"] / c["rows"] * 1e6
        rows.append(
            f"{name} | {c['rows']} x {c['row_bytes'] // 1024} KiB | {c['check_s'] * 1000:.1f} | "
            f"{per_row:.1f} | {crc:.1f} | {b['pipeline_s']:.1f} | **{c['share']:.3%}**"
        )
    if not rows:
        return []
    header = (
        "backbone | rows | check ms | us/row | crc32 us/row | extraction s | check / extraction"
    )
    return [
        "",
        "Row digests: `arrays.RowCheck` (xxh3_64 of every row as read, against the digest "
        "written with it) timed alone over every row of both splits, in the extraction's "
        "batches read beforehand, best of 3 passes in a fresh process; beside it zlib.crc32 "
        "of the same rows. The share is of the best extraction above, which includes the "
        "check (its reader threads run it).",
        "",
        *_table(header, rows),
    ]


def _intro_features(r: dict) -> list[str]:
    return [
        f"`features.extract` (memmap arrays -> reader thread -> forward -> .h5; batch "
        f"{r['batch_size']}; {r['weights']} weights; {r.get('precision', 'float32')}; TTA "
        f"{r.get('tta', 'none')}), timed as one whole call, against the same "
        "compiled forward pass (built by the same public call, `features.build_forward`, "
        "on the same devices) called on one batch in host memory, copied to the device and "
        "fetched each call with one call in flight, as many calls as the "
        "extraction makes. Both in one process: half the bare calls before the extraction, half "
        "after, so that a slow drift in the machine's load hits both alike; a fast backbone "
        "gets several such runs (fresh processes) and the best pipeline and best bare time "
        "count. Ratios are bare / pipeline (1 = no overhead): 'pipeline / bare' end to end, the "
        "target's figure; 'streaming' without the fixed cost before the first batch. 'fixed s' "
        "is that cost timed on the same public calls in the same process, after the bare "
        "pass's own build (build the model again, trace its forward pass; `extract` also opens "
        "its file): it does not grow with the data. Robust "
        "to the load of a shared machine, from the best pipeline run: 'CPU', CPU seconds of all "
        "threads, bare / pipeline (the pipeline's include the fixed cost).",
    ]


def _section_memory(r: dict) -> list[str]:
    rows = []
    for stage in ("preprocess", "features"):
        for label in ("1N", "4N"):
            point, m = r["points"][label], r["points"][label][stage]
            rows.append(
                f"{stage} | {label} | {point['train'] + point['test']} | {m['rss_self_mb']:.0f} | "
                f"{m['rss_children_mb']:.0f} | {m.get('tree_rss_mb', 0):.0f} | "
                f"{m.get('tree_pss_mb', 0):.0f} | {_peak_mb(m):.0f}"
            )
        ratio = _peak_mb(r["points"]["4N"][stage]) / _peak_mb(r["points"]["1N"][stage])
        rows.append(f"{stage} | 4N / N | | | | | | **{ratio:.3f}**")
    header = (
        "stage | size | images | main MB | largest child MB | tree RSS MB | tree PSS MB | peak MB"
    )
    return [
        f"N = {r['n']} train + {r['n'] // 2} test images, 4N = {4 * r['n']} + {2 * r['n']}: "
        f"symlinks into the data set (cycled), never copies. Features: {r['backbone']} (random "
        f"weights), {r['size']}px. Each stage in its own process. 'main': that process's peak "
        "RSS (kernel ru_maxrss, exact). 'largest child': its RUSAGE_CHILDREN peak, i.e. the "
        "largest single pool worker, not a sum. 'tree RSS' / 'tree PSS': peaks of the RSS and "
        "of the PSS summed over the whole process tree, sampled every 0.1 s; RSS counts shared "
        "libraries once per process (too high for a pool), PSS divides shared pages among all "
        "processes that map them, other users' included (can be too low). 'peak': the largest "
        "of main, largest child and tree RSS; the targets use it.",
        "",
        *_table(header, rows),
    ]


def _section_growth(r: dict) -> list[str]:
    rows = []
    for stage in ("preprocess", "features"):
        small, large = r["points"]["1N"][stage], r["points"]["4N"][stage]
        a, b = small["seconds"] / small["images"], large["seconds"] / large["images"]
        marginal = (large["seconds"] - small["seconds"]) / (large["images"] - small["images"])
        rows.append(
            f"{stage} | {small['seconds']:.2f} | {large['seconds']:.2f} | {a * 1e3:.3f} | "
            f"{b * 1e3:.3f} | **{b / a:.3f}** | {marginal * 1e3:.3f}"
        )
    header = "stage | s at N | s at 4N | ms/image N | ms/image 4N | 4N / N | marginal ms/image"
    return [
        "The runs of the memory table: seconds of the stage call (its fixed start-up included) "
        "over all its images. 'marginal' is (T(4N) - T(N)) / (images(4N) - images(N)), the cost "
        "of one more image with the fixed part taken out.",
        "",
        *_table(header, rows),
    ]


def _section_submission(r: dict) -> list[str]:
    rows = [f"cold `make {target}` | {seconds:.1f}" for target, seconds in r["cold"].items()]
    rows += [f"**cold total** | **{r['cold_total']:.1f}**", f"**warm** | **{r['warm_s']:.2f}**"]
    heavy = ", ".join(r["warm_heavy_modules"]) or "none"
    return [
        f"`{r['command']}`. DATA_DIR is a /tmp folder of symlinks to the data, so it has a "
        "dataset key of its own and nothing is reused; its outputs are removed afterwards. Cold: "
        "the four targets in turn, with a fresh, empty KERAS_HOME (no converted weights cached "
        "either); image files may be in the page cache. Warm: the same `make submission` again.",
        "",
        *_table("step | seconds", rows),
        "",
        f"Cold run's out-of-fold log loss {r['oof_log_loss']:.5f}, accuracy "
        f"{r['oof_accuracy']:.4f}.",
        "",
        f"Warm run's output: `{r['warm_output']}`. Run with PYTHONPROFILEIMPORTTIME=1, so every "
        "Python started (make's parse-time registry call included) lists each module it "
        f"imports: {r['warm_pythons']} Python process(es), {r['warm_modules']} modules; of "
        f"{', '.join(r['heavy_checked'])}: **{heavy}**.",
    ]


def _precision_verdict(r: dict) -> str:
    """Default only if faster for every backbone measured and the log loss is not worse."""
    faster = [f"{n} {x:.2f}x" for n, x in r["speedups"].items() if x > 1]
    slower = [f"{n} {x:.2f}x" for n, x in r["speedups"].items() if x <= 1]
    worse = "worse" if r["loss_change"] > 0 else "not worse"
    loss = f"out-of-fold log loss {r['loss_change']:+.5f} on {r['backbone']}, {worse}"
    if r["recommend_default"]:
        return f"bfloat16 is faster for every backbone ({', '.join(faster)}), {loss}: default it."
    if faster:
        return (
            f"Keep float32 the default: bfloat16 is slower for {', '.join(slower) or 'none'} "
            f"and faster for {', '.join(faster)} ({loss}). Keep PRECISION=bfloat16 as the "
            "option for the backbones it speeds up."
        )
    return f"bfloat16 is faster for no backbone here ({', '.join(slower)}): keep float32."


def _section_precision(r: dict) -> list[str]:
    e, h, d = r["extract"], r["heads"], r["diff"]
    f32, bf16 = e["float32"]["seconds"], e["bfloat16"]["seconds"]
    c32, c16 = e["float32"]["cpu_s"], e["bfloat16"]["cpu_s"]
    rows = [
        f"extraction s (end to end) | {f32:.1f} | {bf16:.1f} | {r['speedup']:.2f}x",
        f"extraction CPU s (all threads) | {c32:.1f} | {c16:.1f} | {r['cpu_speedup']:.2f}x",
    ]
    for name, b in r["bare"].items():
        s, m = b["seconds"], b["median_s"]
        rows.append(
            f"bare forward s, {name} ({b['images']} images, alternated) | {s['float32']:.2f} | "
            f"{s['bfloat16']:.2f} | {s['float32'] / s['bfloat16']:.2f}x"
        )
        rows.append(
            f"bare forward, median s per call, {name} | {m['float32']:.3f} | "
            f"{m['bfloat16']:.3f} | {r['speedups'][name]:.2f}x"
        )
    h32, h16 = h["float32"], h["bfloat16"]
    rows.append(
        f"out-of-fold log loss (logreg) | {h32['log_loss']:.5f} | {h16['log_loss']:.5f} | "
        f"{r['loss_change']:+.5f}"
    )
    rows.append(f"out-of-fold accuracy | {h32['accuracy']:.4f} | {h16['accuracy']:.4f} |")
    return [
        f"{r['backbone']} ({r['weights']} weights) on the whole data set, TTA none, extracted "
        "once in each precision (bfloat16: Keras mixed_bfloat16 compute, features stored as "
        "float32); the logreg head (`dogscats.cli train`, "
        f"{r['folds']} folds) trained on each file. Other backbones: bare forward speed only, "
        "random weights (no ImageNet weights for them on this offline machine). The verdict "
        "goes by the median bare forward call of each backbone, the two precisions alternated "
        "round by round; the end-to-end extractions ran one after the other, so a burst of "
        "load could favour either.",
        "",
        *_table(" | float32 | bfloat16 | speed-up / change", rows),
        "",
        f"Largest feature difference: {d['max_abs_diff']:.4g} (largest feature value "
        f"{d['max_abs_value']:.4g}; mean absolute difference {d['mean_abs_diff']:.3g}; "
        f"per-image relative L2 error: mean {d['mean_rel_l2']:.3g}, max {d['max_rel_l2']:.3g}).",
        "",
        f"**{_precision_verdict(r)}**",
    ]


def _section_allocator(r: dict) -> list[str]:
    if "skipped" in r:
        return [f"Skipped: {r['skipped']}."]
    rows = [
        f"{name} | {r['rate'][name]:.1f} | {r['faults_per_image'][name]:.0f} | "
        f"{r['cpu_s'][name]:.1f} | {', '.join(f'{x:.1f}' for x in r['runs_s'][name])}"
        for name in r["rate"]
    ]
    verdict = "BFC is faster" if r["speedup"] > 1 else "the default is faster"
    return [
        f"`features.extract` of {r['backbone']} (random weights, batch {r['batch_size']}) on "
        f"{r['images']} images, in fresh processes with TensorFlow's default CPU allocator and "
        "with `TF_CPU_ALLOCATOR_USE_BFC=true`, alternated round by round; the best run of "
        "each counts. Page faults: the process's minor faults over the whole run, per image.",
        "",
        *_table("allocator | img/s | page faults / image | CPU s | runs s", rows),
        "",
        f"**BFC / default speed: {r['speedup']:.2f} ({verdict}).**",
    ]


def _section_finetune(r: dict) -> list[str]:
    rows, images = [], next(iter(r["variants"].values()))["images"]
    for name, v in r["variants"].items():
        first, later = v["epochs"][0], v["epochs"][1:]
        steady = min(e["epoch_s"] for e in later)
        compiles = " / ".join(str(e["compiles"]) for e in v["epochs"])
        compile_s = sum(e["compile_s"] for e in v["epochs"])
        rows.append(
            f"{name} | {v['train_rate']:.1f} | {v['forward_rate']:.1f} | "
            f"{v['train_rate'] / v['forward_rate']:.2f} | {first['epoch_s']:.1f} | {steady:.1f} | "
            + (f"{compiles} ({compile_s:.1f} s)" if v["backend"] == "jax" else "n/a")
        )
    return [
        f"`model.fit` of the fine-tuning model of {r['backbone']} (`BLOCKS=1`, random weights, "
        f"batch {r['batch_size']}, {r['epochs']} epochs of {images} images with a partial "
        "last batch, validating each epoch as the trainer does) on "
        f"KERAS_BACKEND={r['backend']}, DEVICES={r['devices']}, each variant in a fresh process. "
        "Training img/s: the steps after each epoch's first, best epoch after the first. "
        "Forward: the bare compiled forward pass of the whole backbone, same batch. Compiled: "
        "programs XLA compiled in each epoch (JAX only).",
        "",
        *_table(
            "variant | training img/s | forward img/s | training / forward | first epoch s | "
            "later epoch s | compiled per epoch",
            rows,
        ),
    ]


def _section_litert(r: dict) -> list[str]:
    rows = [
        f"{name} | {b['input_size']} | {b['rate']['tensorflow']:.1f} | "
        f"{b['rate']['litert']:.1f} | {b['speedup']:.2f}x | {b['max_abs_diff']:.2g} | "
        f"{b['export_or_load_s']:.1f}"
        for name, b in r["backbones"].items()
    ]
    return [
        "RUNTIME=litert's forward pass (the export `extract` runs: the cast to float32 and the "
        f"interpreter on {r['workers']} threads) against TensorFlow's bare compiled forward "
        f"pass (`features.build_forward`, RUNTIME=keras), batch {r['batch_size']}, "
        f"{r['weights']} weights, each backbone at its default size; both in one process, "
        f"alternated {r['rounds']} rounds of {r['calls']} calls each; img/s from the median "
        "call. Difference: the largest absolute difference of their features on one batch. "
        "Export: building the LiteRT model, or loading it from the cache ($KERAS_HOME/litert).",
        "",
        *_table(
            "backbone | size | TensorFlow img/s | LiteRT img/s | LiteRT / TensorFlow | "
            "difference | export or load s",
            rows,
        ),
    ]


def _section_cut_cache(r: dict) -> list[str]:
    row = (
        f"{r['backbone']} | {r['images']} | {r['from_images_s']:.1f} | {r['derived_s']:.1f} | "
        f"{r['derived_s'] / r['from_images_s']:.2f} | {r['max_abs_diff']:.1e} "
        f"(maps up to {r['max_abs_value']:.0f})"
    )
    return [
        f"Fine-tuning's cut cache of `BLOCKS=1` (cut at {r['cut']}) of {r['backbone']} at "
        f"{r['input_size']} px, {r['weights']} weights, batch {r['batch_size']}, every image and "
        f"its mirror, in one process: built from the images (RUNTIME={r['runtime']}, as `make "
        f"finetune` fills it), then derived from the cache of `BLOCKS=2` (cut at "
        f"{r['lower_cut']}, made first in {r['lower_s']:.1f} s): only the block between the "
        "two cuts runs, over the cached maps. Largest difference: between the two caches.",
        "",
        *_table(
            "backbone | images | from the images s | derived s | derived / from the images | "
            "largest difference",
            [row],
        ),
    ]


SECTIONS: list[tuple[str, str, Callable[[dict], list[str]]]] = [
    ("1. Preprocessing", "preprocess", _section_preprocess),
    ("2. Feature extraction", "features", _section_features),
    ("3. Memory: peak RSS on N and 4N", "scaling", _section_memory),
    ("4. Cost growth: seconds per image on N and 4N", "scaling", _section_growth),
    ("5. make submission, cold and warm", "submission", _section_submission),
    ("6. Precision: bfloat16 against float32", "precision", _section_precision),
    ("7. TensorFlow's CPU allocator", "allocator", _section_allocator),
    ("8. Fine-tuning against the forward pass", "finetune", _section_finetune),
    ("9. LiteRT against TensorFlow's forward pass", "litert", _section_litert),
    ("10. Fine-tuning's cut cache: derived from a lower cut", "cut_cache", _section_cut_cache),
]


def render(results: dict, meta: dict) -> str:
    lines = [
        "# Benchmark: the pipeline against its bare parts",
        "",
        f"Written by `{meta['command']}` on {meta['date']}; took {meta['minutes']:.1f} min. "
        "Ratios compare figures measured in this same run.",
        "",
        f"Data: `{meta['data_dir']}` ({meta['images']}). {meta['sizes']}",
        "",
        "## Machine and versions",
        "",
        *_table(" | ", [f"{k} | {v}" for k, v in meta["machine"].items()]),
        "",
        "## Targets",
        "",
        *_table(
            "target | measured | ", [f"{t} | {m} | {_yes(ok)}" for t, m, ok in targets(results)]
        ),
    ]
    for title, stage, section in SECTIONS:
        if stage not in results:
            continue
        lines += ["", f"## {title}", ""]
        if "error" in results[stage]:
            lines.append(f"**Failed:** `{results[stage]['error']}`")
        else:
            lines += section(results[stage])
    return "\n".join(lines) + "\n"


def _ratio(value: float | None) -> str:
    """A ratio to three decimals, or n/a where it could not be measured."""
    return "n/a" if value is None else f"{value:.3f}"
