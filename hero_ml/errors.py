"""The root of HERO's own errors (no imports: every layer may raise one)."""


class HeroError(Exception):
    """An error its reader can act on: the message says what was wrong and how to fix it. The `hero`
    command prints one as a line, not a traceback."""
