"""experiments/colab_tpu.ipynb runs top to bottom as written, as Colab would run it.

Colab is simulated: ``google.colab.drive.mount`` makes a folder, the shell
(``subprocess.run``: git, pip) is recorded instead of run, ``/content`` is a temporary
folder (``COLAB_CONTENT``). The ``setup`` cells (Drive, install) run in notebook
order, then the kernel restarts (a fresh namespace, as *Restart session* gives), then
every ``cpu-safe`` cell runs. That catches cells in the wrong order (installing from a
Drive path before Drive is mounted), cells that need a variable a restart forgot,
missing imports, and test-only packages installed into Colab.
"""

import ast
import pathlib
import sys
import types

import jax
import nbformat
import pytest
from flax import nnx

from transformer_jax import model as model_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / 'experiments' / 'colab_tpu.ipynb'
TEST_ONLY = ('pytest', 'selenium', 'pytest-xdist', 'libtpu')


@pytest.fixture(scope='module')
def notebook():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  return nb


def _tags(cell):
  return set(cell.get('metadata', {}).get('tags', []))


def _code(notebook, tag=None):
  return [c for c in notebook.cells
          if c.cell_type == 'code' and (tag is None or tag in _tags(c))]


def test_notebook_cells_are_python(notebook):
  code = _code(notebook)
  assert code and all(_tags(c) & {'setup', 'cpu-safe', 'accelerator'} for c in code), (
      'every code cell is tagged setup, cpu-safe or accelerator')
  for i, cell in enumerate(code):
    ast.parse(cell.source, filename=f'{NOTEBOOK.name} code cell {i}')


class _Colab:
  """Drive, the shell and /content of a Colab runtime, faked in ``root``."""

  def __init__(self, root: pathlib.Path, monkeypatch):
    self.content = root / 'content'
    self.content.mkdir()
    self.commands: list[list[str]] = []
    monkeypatch.setenv('COLAB_CONTENT', str(self.content))
    drive = types.ModuleType('google.colab.drive')
    drive.mount = self.mount
    colab = types.ModuleType('google.colab')
    colab.drive = drive
    google = sys.modules.get('google') or types.ModuleType('google')
    monkeypatch.setattr(google, 'colab', colab, raising=False)
    monkeypatch.setitem(sys.modules, 'google', google)
    monkeypatch.setitem(sys.modules, 'google.colab', colab)
    monkeypatch.setitem(sys.modules, 'google.colab.drive', drive)
    import subprocess
    monkeypatch.setattr(subprocess, 'run', self.run)

  def mount(self, path):
    mydrive = pathlib.Path(path) / 'MyDrive'
    mydrive.mkdir(parents=True)
    # The user's checkout on Drive: this repository.
    (mydrive / 'transformer_jax').symlink_to(REPO_ROOT)

  def run(self, command, check=False, **kwargs):
    command = [str(c) for c in command]
    self.commands.append(command)
    if command[:2] == ['git', 'clone']:
      source, dest = command[2], pathlib.Path(command[3])
      assert '://' in source or source.endswith('.git'), f'git clone of {source!r}'
      dest.symlink_to(REPO_ROOT)
    return types.SimpleNamespace(returncode=0)

  def run_cells(self, cells, namespace, source: str):
    for cell in cells:
      code = cell.source.replace("SOURCE = ''", f'SOURCE = {source!r}', 1)
      exec(compile(code, NOTEBOOK.name, 'exec'), namespace)  # noqa: S102


@pytest.mark.parametrize('where', ['drive', 'git'])
def test_notebook_runs_top_to_bottom_with_a_restart(notebook, where, tmp_path,
                                                    monkeypatch):
  colab = _Colab(tmp_path, monkeypatch)
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv('TRANSFORMER_JAX_WORKDIR', str(tmp_path / 'runs'))
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'tfds'))
  source = (str(colab.content / 'drive' / 'MyDrive' / 'transformer_jax')
            if where == 'drive' else 'https://example.org/transformer_jax.git')
  colab.run_cells(_code(notebook, 'setup'), {'__name__': '__notebook__'}, source)
  # Runtime > Restart session: every variable is gone, the files stay.
  namespace = {'__name__': '__notebook__'}
  monkeypatch.chdir(tmp_path)
  colab.run_cells(_code(notebook, 'cpu-safe'), namespace, source)

  clones = [c for c in colab.commands if c[:2] == ['git', 'clone']]
  assert len(clones) == (where == 'git')
  installs = [c for c in colab.commands if 'pip' in c]
  assert installs, 'the install cell installs the package'
  for command in installs:
    for arg in command:
      assert not any(arg.startswith(pkg) for pkg in TEST_ONLY), command
      assert '[test]' not in arg, command
  requirements = (REPO_ROOT / 'requirements.txt').read_text()
  assert not any(line.split('==')[0].strip() in TEST_ONLY
                 for line in requirements.splitlines()), 'test-only pins in requirements'
  assert any('jax[tpu]==' in arg for c in installs for arg in c)

  config, smoke = namespace['config'], namespace['smoke_config']
  assert config.data.data_dir == str(tmp_path / 'tfds')
  # The paper's ~25k-token batch, whatever the number of chips.
  assert (config.data.tokens_per_batch * config.optim.grad_accum_steps ==
          pytest.approx(25_000, rel=0.01))
  assert smoke.train.num_steps < config.train.num_steps
  cfg = model_lib.TransformerConfig.from_config(config.model, config.data.vocab_size)
  abstract = nnx.eval_shape(lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(0)))
  assert namespace['num_params'] == sum(
      x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def test_config_cell_without_install_says_what_to_run(notebook, tmp_path, monkeypatch):
  _Colab(tmp_path, monkeypatch)
  with pytest.raises(RuntimeError, match='run the Drive and install cells first'):
    exec(compile(_code(notebook, 'cpu-safe')[0].source, NOTEBOOK.name, 'exec'),  # noqa: S102
         {'__name__': '__notebook__'})


def test_install_from_an_unmounted_drive_path_says_so(notebook, tmp_path, monkeypatch):
  colab = _Colab(tmp_path, monkeypatch)
  install = [c for c in _code(notebook, 'setup') if 'SOURCE' in c.source]
  with pytest.raises(ValueError, match='mount Drive'):
    colab.run_cells(install, {'__name__': '__notebook__'},
                    str(colab.content / 'drive' / 'MyDrive' / 'transformer_jax'))
