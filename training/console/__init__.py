"""The CLI's printers: every table `tlserve` draws in a terminal."""
