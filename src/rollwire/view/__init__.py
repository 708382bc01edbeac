"""Looking at runs: a self-contained HTML page (`rollwire view`), the run's figures
(`rollwire inspect`, `summary.json`) and, optionally, the same figures in wandb."""

from rollwire.view.html import PageStats, render_page, write_page
from rollwire.view.summary import SUMMARY, run_summary, write_summary

__all__ = ["SUMMARY", "PageStats", "render_page", "run_summary", "write_page", "write_summary"]
