"""The one atomic-write helper: a reader sees the old file or the new one, never a part, whatever fails when."""
import os

import pytest

from vit_moe._files import atomic_write, install_folder


def test_atomic_write_replaces_the_file_and_leaves_nothing_beside_it(tmp_path):
    path = tmp_path / 'log.jsonl'
    path.write_text('old\n')
    atomic_write(path, 'new\r\nline\n')  # written as given (no newline translation)
    assert path.read_bytes() == b'new\r\nline\n' and os.listdir(tmp_path) == ['log.jsonl']
    atomic_write(path, b'\x00bytes')
    assert path.read_bytes() == b'\x00bytes'


def test_a_failed_atomic_write_keeps_the_old_file_and_removes_its_partial(tmp_path, monkeypatch):
    path = tmp_path / 'config.yaml'
    path.write_text('old')

    def replace_fails(src, dst):
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(os, 'replace', replace_fails)
    with pytest.raises(OSError, match='No space left'):
        atomic_write(path, 'new')
    assert path.read_text() == 'old' and os.listdir(tmp_path) == ['config.yaml']


def test_install_folder_replaces_the_previous_folder_durably(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(os, 'fsync', lambda fd: synced.append(os.readlink(f'/proc/self/fd/{fd}')))
    final, tmp = tmp_path / 'model', tmp_path / 'model.tmp'
    final.mkdir()
    (final / 'old.txt').write_text('old')
    tmp.mkdir()
    (tmp / 'weights').write_text('new')
    install_folder(tmp, final)
    assert sorted(os.listdir(tmp_path)) == ['model'] and os.listdir(final) == ['weights']
    # the file and its folder were flushed before the rename, the parent after it
    assert synced.index(str(tmp / 'weights')) < synced.index(str(tmp)) < synced.index(str(tmp_path))


def test_install_folder_puts_the_previous_folder_back_when_the_rename_fails(tmp_path, monkeypatch):
    final, tmp = tmp_path / 'model', tmp_path / 'model.tmp'
    final.mkdir()
    (final / 'old.txt').write_text('old')
    tmp.mkdir()
    real, calls = os.replace, []

    def second_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(5, 'Input/output error')
        return real(src, dst)

    monkeypatch.setattr(os, 'replace', second_fails)
    with pytest.raises(OSError, match='Input/output error'):
        install_folder(tmp, final)
    assert (final / 'old.txt').read_text() == 'old'
