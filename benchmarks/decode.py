"""Decoding speed: sentences/s and tokens/s for beam search (K=4) and greedy search.

Shapes of the Flax WMT example's decoding benchmark: d_model 128, 2 + 2 layers,
d_ff 512, 4 heads, vocabulary 8000, 8 sources of 32 tokens, 64 decoding steps
(output limit = 32 source tokens + 32), random weights, timed after compilation.
That example decodes about 45 sentences/s with beam 4 on the project's 2-core
CPU; the printed ratio is against that figure. The CPU is shared, and its speed
swings with the load average (printed): compare ratios measured under similar load.

  python benchmarks/decode.py [--repeats=10] [--batch=8]

The machine is shared, so each search runs ``--repeats`` times, beam and greedy
interleaved; the figures use the fastest run (the least disturbed), and the median,
the process's CPU time per batch (which moves less with the load than wall time)
and the load average are printed beside them.
"""

import argparse
import os
import platform
import time

import jax
import numpy as np
from flax import nnx

from transformer_jax import model as model_lib
from transformer_jax.inference import search
from transformer_jax.inference.translator import BatchSearch
import machine  # benchmarks/machine.py

FLAX_WMT_BEAM4_SENTENCES_PER_S = 45.0


def _machine() -> str:
  device = jax.devices()[0]
  if device.platform == 'cpu':
    return f'{os.cpu_count()}-core CPU ({machine.cpu_model()}, {platform.machine()})'
  return f'{device.device_kind} ({device.platform})'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--src_len', type=int, default=32)
  parser.add_argument('--steps', type=int, default=64)
  args = parser.parse_args()

  cfg = model_lib.TransformerConfig(
      vocab_size=8000, num_encoder_layers=2, num_decoder_layers=2, d_model=128,
      num_heads=4, d_ff=512, dropout_rate=0.0)
  model = model_lib.Transformer(cfg, rngs=nnx.Rngs(0))
  rng = np.random.RandomState(0)
  # Source ids avoid pad/eos/bos/unk; every row is a full 32-token sentence.
  src = rng.randint(4, cfg.vocab_size, (args.batch, args.src_len)).astype(np.int32)
  src[:, -1] = search.EOS_ID
  load = os.getloadavg()
  print(f'machine: {_machine()}, jax {jax.__version__}, backend {jax.default_backend()}')
  print(f'model: d_model 128, 2+2 layers, d_ff 512, 4 heads, vocab 8000; '
        f'{args.batch} sources x {args.src_len} tokens, up to {args.steps} steps')

  searches = {}
  for name, beam in (('beam 4', 4), ('greedy', 1)):
    decoder = BatchSearch(model, beam_size=beam, alpha=0.6,
                          max_extra_len=args.steps - args.src_len)
    t0 = time.perf_counter()
    tokens, _ = decoder(src)  # Compiles.
    searches[name] = (decoder, time.perf_counter() - t0, tokens, [], [])
  for _ in range(args.repeats):
    for decoder, _, _, times, cpu_times in searches.values():
      t0, c0 = time.perf_counter(), time.process_time()
      decoder(src)
      times.append(time.perf_counter() - t0)
      cpu_times.append(time.process_time() - c0)
  print(f'load average before timing: {load[0]:.2f}, after: {os.getloadavg()[0]:.2f}')
  for name, (decoder, compile_s, tokens, times, cpu_times) in searches.items():
    best = tokens[:, 0]
    # Output tokens of the best hypotheses, up to and including EOS.
    lengths = [(row.tolist().index(search.EOS_ID) + 1) if search.EOS_ID in row
               else int(np.sum(row != search.PAD_ID)) for row in best]
    seconds = min(times)
    sent_s = args.batch / seconds
    line = (f'{name:7s}: {sent_s:8.1f} sentences/s  {sum(lengths) / seconds:9.1f} tokens/s'
            f'  (fastest of {args.repeats}: {seconds * 1e3:.1f} ms/batch, median '
            f'{np.median(times) * 1e3:.1f} ms; CPU {min(cpu_times) * 1e3:.1f} ms/batch '
            f'fastest, {np.median(cpu_times) * 1e3:.1f} median; mean output '
            f'{np.mean(lengths):.1f} tokens; compile {compile_s:.1f} s)')
    if decoder.beam_size == 4:
      line += (f'  -> {sent_s / FLAX_WMT_BEAM4_SENTENCES_PER_S:.2f}x the Flax WMT '
               f'example ({FLAX_WMT_BEAM4_SENTENCES_PER_S:.0f} sentences/s)')
    print(line, flush=True)


if __name__ == '__main__':
  main()
