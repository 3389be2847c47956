"""The terminal app and CLI over ``core``: app.py, screens/ and widgets (Textual),
services.py (the screens' door into core), commands/ (CLI), launcher and resident server.
"""

__version__ = "0.1.0"
