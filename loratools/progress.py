"""The progress convention every long-running library function follows.

Library code never prints: it takes ``progress: Progress | None`` and calls ``progress(done, total, name)``
after each unit of work (a tensor, a layer, a module). The CLI turns that into a rich progress bar.
"""

from collections.abc import Callable

Progress = Callable[[int, int, str], None]
