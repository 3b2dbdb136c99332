"""Process groups and parallel layout."""
