"""Files the README's examples use: IDs to submit, and a downstream to call."""
