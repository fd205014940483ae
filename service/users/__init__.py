"""Users: received by IDs, or created by hand."""
