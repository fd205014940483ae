"""Planning: the pure planner, and planning tasks, retries, previews and resumed limits
into their limit's windows."""
