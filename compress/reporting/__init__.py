"""Stage 4: the typed, versioned report and its views (Markdown, HTML, plots, rankings, run folders)."""
