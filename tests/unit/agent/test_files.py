"""agent/files.py: in-place writes keep the inode a bind mount holds; renames do not."""

from __future__ import annotations

import os
import subprocess

import pytest

from agent.files import PUBLIC_DIR_MODE, PUBLIC_FILE_MODE, write_in_place, write_text_if_changed


def test_in_place_write_keeps_the_inode_and_cuts_a_longer_old_text(tmp_path):
    path = str(tmp_path / "netns" / "web" / "hosts")
    write_in_place(path, "127.0.0.1\tlocalhost\n10.96.0.10\tweb web.default\n", PUBLIC_FILE_MODE, PUBLIC_DIR_MODE)
    inode = os.stat(path).st_ino
    with open(path) as held:  # a reader holding the file, as a bind mount holds its inode
        assert write_text_if_changed(path, "127.0.0.1\tlocalhost\n", PUBLIC_FILE_MODE, PUBLIC_DIR_MODE,
                                     in_place=True)
        assert held.read() == "127.0.0.1\tlocalhost\n"
    assert os.stat(path).st_ino == inode and os.stat(path).st_mode & 0o777 == PUBLIC_FILE_MODE
    assert os.stat(os.path.dirname(path)).st_mode & 0o777 == PUBLIC_DIR_MODE
    assert not write_text_if_changed(path, "127.0.0.1\tlocalhost\n", PUBLIC_FILE_MODE, PUBLIC_DIR_MODE,
                                     in_place=True), "the same text is not written again"


def test_a_rename_leaves_the_reader_with_the_old_inode(tmp_path):
    """Why hosts files are written in place: what `ip netns exec` did with the old way."""
    path = str(tmp_path / "hosts")
    write_text_if_changed(path, "old\n", PUBLIC_FILE_MODE, PUBLIC_DIR_MODE)
    with open(path) as held:
        write_text_if_changed(path, "new\n", PUBLIC_FILE_MODE, PUBLIC_DIR_MODE)
        assert held.read() == "old\n"


def test_in_place_write_refuses_a_planted_symlink(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("precious\n")
    link = tmp_path / "hosts"
    link.symlink_to(target)
    with pytest.raises(OSError):
        write_in_place(str(link), "127.0.0.1\tlocalhost\n", PUBLIC_FILE_MODE, PUBLIC_DIR_MODE)
    assert target.read_text() == "precious\n"


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/unshare"), reason="needs root for mounts")
def test_a_bind_mounted_copy_sees_an_in_place_write(tmp_path):
    """The case itself: a file bind-mounted over another (as `ip netns exec` mounts
    /etc/netns/NAME/hosts over /etc/hosts) shows what an in-place write puts there later."""
    src, over = tmp_path / "hosts", tmp_path / "etc-hosts"
    src.write_text("before\n")
    over.write_text("host's\n")
    script = (f'mount --bind "{src}" "{over}" && echo mounted && read line && cat "{over}"')
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "mounted"
        write_in_place(str(src), "after\n", PUBLIC_FILE_MODE, PUBLIC_DIR_MODE)
        out, _ = proc.communicate("go\n", timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert out == "after\n"
