"""What a run reports: results.json / results.md, figures, statistics over seeds, progress lines."""
