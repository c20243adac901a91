"""`make report`: one self-contained HTML page per dataset that shows every run.

table.py reads the runs into rows (scores as the stages and `make score` compute them);
figures.py draws the plots; gallery.py picks and draws the most-wrong train and least-certain
test images and writes the most-wrong list; page.py renders the HTML; stage.py runs it all.
"""

from dogscats.report.stage import K, write_report

__all__ = ["K", "write_report"]
