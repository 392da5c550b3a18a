"""What a person looks at: progress, dashboard notes, the summary table, the HTML report, the dashboard."""
