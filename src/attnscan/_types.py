"""Types shared by several stages, defined once."""

from __future__ import annotations

from collections.abc import Callable

ProgressFn = Callable[[int, int, str], None]
"""``progress(done, total, label)``: units done so far (prompts, layers ...), their total, and what is running."""

NoticeFn = Callable[[str], None]
"""``on_notice(sentence)``: something the user should hear about while a job runs (back-off, resume ...)."""
