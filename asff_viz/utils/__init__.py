"""Small shared helpers: command-line argument types (`argtypes`), atomic file writes (`fileio`) and the
identity of the code that made a result (`codeversion`)."""
