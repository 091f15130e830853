"""A build killed half-way leaves its temporary files; the next build of that directory
removes the ones old enough to be nobody's (no build outlives the compiler's timeout),
only those named as netcompiler names them."""
import os
import time

from netcompiler.build import STALE_SECONDS, compile_rendered
from netcompiler.check import check_text
from netcompiler.render import render

TINY = "name: tmpnet\ninput: [1, 2, 2]\nlayers:\n  - flatten\n  - linear: {out_features: 2}\nloss: cross_entropy\n"


def test_old_build_temporaries_are_removed_and_others_kept(tmp_path):
    old = time.time() - STALE_SECONDS - 60
    stale = [".tmpnet.so.k3j_x9q2.tmp", ".tmpnet.c.abcdefgh.tmp", ".tmpnet.h.00000000.tmp", "..tmpnet.key.zzzzzzzz.tmp"]
    fresh = [".tmpnet.so.inflight.tmp"]  # another build's, still running
    kept = [".tmpnet.so.mine.tmp", "tmpnet.so.abcdefgh.tmp", ".other.so.abcdefgh.tmp", ".tmpnet.so.abcdefgh.tmp.bak"]
    for name in stale + fresh + kept:
        (tmp_path / name).write_bytes(b"\0" * 1000)
        if name not in fresh:
            os.utime(tmp_path / name, (old, old))
    built = compile_rendered(render(check_text(TINY, "t.yaml")), out_dir=tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert not names & set(stale)
    assert set(fresh) | set(kept) <= names
    assert built.so_path.exists() and not [n for n in names - set(fresh) - set(kept) if n.endswith(".tmp")]


def test_a_temporary_renamed_while_scanning_is_skipped(tmp_path, monkeypatch):
    """Another build renames its temporary between the listing and the stat: no error."""
    import os

    from netcompiler import fileio

    (tmp_path / ".net.h.abcdefgh.tmp").write_text("x")
    real = os.scandir

    class Vanishing:
        def __init__(self, entries):
            self.entries = entries

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.entries.close()

        def __iter__(self):
            for e in self.entries:
                os.unlink(e.path)  # renamed into place by its writer just now
                yield e

    monkeypatch.setattr(fileio.os, "scandir", lambda d: Vanishing(real(d)))
    assert fileio.remove_stale_temps(tmp_path, ["net.h"], older_than=1200) == []
    assert fileio.remove_stale_temps(tmp_path, ["net.h"]) == []
