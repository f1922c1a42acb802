"""The data audit (`tlserve data check`): duplicates, leaks across splits, odd files, and its page."""
