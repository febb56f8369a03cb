"""Progress for the person watching: tqdm bars on a terminal, plain lines anywhere else.

A bar redraws itself with carriage returns, which is right on a terminal and wrong in a log
file (one line of tens of kilobytes). So `bar()` gives a tqdm bar only when the stream it draws
on (stderr) is a terminal; otherwise a `Lines` stand-in with the same methods, which prints
nothing while it counts and one plain line when it closes ("tokenize: 731 doc in 8.1 s").
The training loop's own plain lines (a line every N steps) are gptjax/training/metrics.py's.
"""

from __future__ import annotations

import sys
import time


def interactive(stream=None) -> bool:
    """True when `stream` (default stderr) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def _amount(n: float, unit: str) -> str:
    if unit == "B":  # bytes: in kB / MB / GB as tqdm's unit_scale shows them
        for scale, name in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
            if n >= scale:
                return f"{n / scale:.2f} {name}"
        return f"{int(n)} B"
    return f"{int(n):,} {unit}"


class Lines:
    """A progress bar's stand-in off a terminal: counts, and on `close` prints one line with
    the amount and time (none when `final` is False or nothing was counted)."""

    def __init__(self, desc: str | None, unit: str, initial: int = 0, final: bool = True):
        self.desc, self.unit, self.final = desc, unit, final
        self.n = self.start = initial
        self.began = time.perf_counter()
        self.closed = False

    def update(self, n: float = 1) -> None:
        self.n += n

    def set_postfix(self, **_) -> None:
        pass

    def set_postfix_str(self, _: str) -> None:
        pass

    def write(self, text: str, file=None) -> None:
        print(text, file=sys.stderr if file is None else file, flush=True)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        done = self.n - self.start
        if self.final and done:
            seconds = time.perf_counter() - self.began
            head = f"{self.desc}: " if self.desc else ""
            print(f"{head}{_amount(done, self.unit)} in {seconds:.1f} s", file=sys.stderr)


def bar(desc: str | None = None, *, total=None, unit: str = "it", initial: int = 0, **options):
    """A tqdm bar on stderr when it is a terminal, else `Lines` (options: tqdm's, and `final`
    for Lines: print its closing line)."""
    final = options.pop("final", True)
    if not interactive():
        return Lines(desc, unit, initial, final)
    from tqdm import tqdm

    return tqdm(desc=desc, total=total, unit=unit, initial=initial, dynamic_ncols=True, **options)
