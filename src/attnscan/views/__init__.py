"""Views: figures and the HTML report, pure functions of results and tables (no model code)."""
