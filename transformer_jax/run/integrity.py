"""Checkpoint integrity: which saved steps are whole and unchanged, and finite values.

Orbax commits a step by writing ``commit_success.txt`` markers and renaming its
temporary folder, so a crash mid-save never yields a committed step. Damage can
still reach a committed step, and orbax would then restore it silently or fail
deep inside tensorstore:

* a kill while ``max_to_keep`` deletes an old step leaves its folder with some
  items gone;
* a disk, copy or memory error truncates a data file or flips bits in it;
* a diverged run saves NaN parameters.

So the checkpoint layer asks this module which steps are structurally complete
(the step's and every needed item's commit marker, the item's metadata), keeps a
SHA-256 manifest of every file of a step written right after orbax commits it
(orbax's own crc32c covers only zarr3 shard indices, not the OCDBT data files
this project writes), verifies the manifest before a restore, and checks that
restored arrays are finite. A step committed but killed before its manifest was
written has no manifest: it is checked for structure and finiteness only.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

COMMIT_FILE = 'commit_success.txt'  # orbax's commit marker (atomicity.COMMIT_SUCCESS_FILE).
CHECKSUM_FILE = 'checksums.json'
# Items saved as pytrees by orbax's StandardSave: they must hold their _METADATA.
PYTREE_ITEMS = ('params', 'opt_state')


class CorruptCheckpointError(ValueError):
  """A saved step is incomplete, changed since it was saved, or not finite."""


def step_dirs(directory: str) -> dict[int, str]:
  """{step: path} of the integer-named step folders in an orbax checkpoint folder."""
  if not os.path.isdir(directory):
    return {}
  return {int(name): os.path.join(directory, name) for name in os.listdir(directory)
          if name.isdigit() and os.path.isdir(os.path.join(directory, name))}


def structure_problem(path: str, items: tuple[str, ...]) -> str | None:
  """Why the step folder ``path`` cannot hold ``items``, or None if it can.

  Cheap (a few stat calls and one small JSON read), so every listing runs it.
  """
  try:
    names = set(os.listdir(path))
  except OSError as e:
    return f'cannot be listed ({e.strerror})'
  if not names:
    return 'empty step directory'
  if COMMIT_FILE not in names:
    return f'no {COMMIT_FILE}: the save never finished'
  for item in items:
    item_dir = os.path.join(path, item)
    if not os.path.isdir(item_dir):
      return (f'item {item!r} is missing (an old step half-deleted by max_to_keep, '
              'or an incomplete copy)')
    if not os.path.exists(os.path.join(item_dir, COMMIT_FILE)):
      return f'item {item!r} has no {COMMIT_FILE}'
    if item in PYTREE_ITEMS and not os.path.exists(os.path.join(item_dir, '_METADATA')):
      return f'{item}/_METADATA is missing'
  if 'meta' in items:
    meta_file = os.path.join(path, 'meta', 'metadata')
    try:
      with open(meta_file, encoding='utf-8') as f:
        json.load(f)
    except (OSError, ValueError) as e:
      return f'meta/metadata is unreadable ({_first_line(e)})'
  return None


def _files(path: str) -> list[str]:
  out = []
  for root, _, names in os.walk(path):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), path)
      if rel != CHECKSUM_FILE and not rel.endswith('.tmp'):
        out.append(rel)
  return sorted(out)


def _sha256(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.file_digest(f, 'sha256').hexdigest()


def write_checksums(path: str) -> None:
  """Writes ``path/checksums.json``: {relative file: [size, sha256]} of a committed step."""
  manifest = {}
  for rel in _files(path):
    full = os.path.join(path, rel)
    manifest[rel] = [os.path.getsize(full), _sha256(full)]
  tmp = os.path.join(path, CHECKSUM_FILE + '.tmp')
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(manifest, f, indent=0, sort_keys=True)
  os.replace(tmp, os.path.join(path, CHECKSUM_FILE))


def has_checksums(path: str) -> bool:
  return os.path.exists(os.path.join(path, CHECKSUM_FILE))


def checksum_problem(path: str, items: tuple[str, ...] | None = None) -> str | None:
  """The first file of the step (within ``items``) that differs from its manifest.

  Returns None when every listed file matches, or when the step has no manifest.
  """
  manifest_file = os.path.join(path, CHECKSUM_FILE)
  if not os.path.exists(manifest_file):
    return None
  try:
    with open(manifest_file, encoding='utf-8') as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    return f'{CHECKSUM_FILE} is unreadable ({_first_line(e)})'
  for rel, (size, digest) in sorted(manifest.items()):
    if items is not None and rel.split(os.sep)[0] not in items:
      continue
    full = os.path.join(path, rel)
    if not os.path.exists(full):
      return f'{rel} is missing'
    actual = os.path.getsize(full)
    if actual != size:
      return f'{rel} has {actual} bytes, {size} when saved (truncated or overwritten)'
    if _sha256(full) != digest:
      return f'{rel} changed since it was saved (SHA-256 mismatch)'
  return None


def nonfinite_leaves(tree) -> list[str]:
  """Paths of the floating-point leaves of ``tree`` holding NaN or infinity."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  floats = {jax.tree_util.keystr(path): leaf for path, leaf in flat
            if jnp.issubdtype(getattr(leaf, 'dtype', np.int32), jnp.inexact)}
  # One compiled program for the whole tree (sharded arrays on any mesh, several
  # hosts included) rather than an eager reduction per array.
  finite = jax.device_get(_all_finite(floats))
  return [name for name, ok in finite.items() if not bool(ok)]


@jax.jit
def _all_finite(arrays: dict) -> dict:
  return {name: jnp.isfinite(x).all() for name, x in arrays.items()}


def _first_line(e: BaseException) -> str:
  text = str(e).strip() or type(e).__name__
  return text.splitlines()[0][:200]
