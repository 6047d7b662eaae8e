"""Serial lines for the board-host tests: a real pseudo-terminal fed by a thread, and garbage bytes."""

import contextlib
import os
import threading
import tty

from sop.synth import wire

GARBAGE = bytes(b for b in range(256) if b != wire.START)     # never a frame start


@contextlib.contextmanager
def fed_pty(chunks):
    """A pseudo-terminal (raw) and ``start()``: from then on a thread writes ``chunks`` into its far
    end until the block ends, a chunk a millisecond, dropped when the line's buffer is full.
    (Started once the port is open: pyserial flushes what came before.)"""
    master, slave = os.openpty()
    tty.setraw(slave)
    os.set_blocking(master, False)
    stop = threading.Event()

    def feed():
        for chunk in chunks:
            if stop.wait(0.001):
                return
            with contextlib.suppress(BlockingIOError):
                os.write(master, chunk)

    thread = threading.Thread(target=feed, daemon=True)
    try:
        yield os.ttyname(slave), thread.start
    finally:
        stop.set()
        if thread.ident is not None:
            thread.join()
        os.close(slave)
        os.close(master)
