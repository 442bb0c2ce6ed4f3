"""Parameter counts of adapters on any model config, from shapes only.

``python -m hdb_jax.adapters.table --model sd15`` prints the table for SD 1.5 without weights
(``jax.eval_shape`` over the shipped configs); ``--model tiny`` or a diffusers-format directory
works too.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Mapping, Sequence

from hdb_jax.adapters.core import Adapter
from hdb_jax.adapters.kinds import Kron, LiDB, LoRA, Residual
from hdb_jax.adapters.targets import PATTERNS
from hdb_jax.sd import tiny as tiny_lib


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table."""

    label: str
    matrices: int
    variables: int

    @property
    def bytes_f32(self) -> int:
        return 4 * self.variables


def count(abstract: Mapping[str, Any], kind, parts: Sequence[tuple[str, str]], label: str) -> Row:
    """Counts ``kind`` over ``parts``: pairs of (component, pattern name in ``PATTERNS``)."""
    matrices = variables = 0
    for component, pattern in parts:
        adapter = Adapter.create(kind, abstract[component], [PATTERNS[pattern]], component)
        matrices += len(adapter.targets)
        variables += adapter.num_params()
    return Row(label, matrices, variables)


def standard_rows(abstract: Mapping[str, Any], lidb: LiDB | None = None) -> list[Row]:
    """The rows methods.md quotes, for any SD-family model's abstract parameters."""
    lidb = lidb or LiDB()
    unet_attn = [("unet", "unet_attention")]
    text_attn = [("text_encoder", "text_attention")]
    text_mlp = [("text_encoder", "text_mlp")]
    rows = [
        count(
            abstract,
            lidb,
            unet_attn + text_attn,
            f"LiDB a={lidb.a} b={lidb.b} r={lidb.rank}: UNet + text attention",
        ),
        count(abstract, lidb, unet_attn + text_attn + text_mlp, "LiDB: UNet + text attention + text MLP"),
        count(abstract, LoRA(rank=1), unet_attn, "LoRA per unit rank: UNet attention"),
    ]
    for a1, a2 in ((64, 8), (4, 64), (8, 64)):  # the official SD recipe, then the paper's two others
        try:
            rows.append(count(abstract, Kron(a1=a1, a2=a2), unet_attn, f"Kron ({a1},{a2}): UNet attention"))
        except ValueError as err:  # widths of small models need not divide
            print(f"skipped Kron ({a1},{a2}): {err}")
    rows.append(count(abstract, Residual(), [("unet", "unet_proj_out")], "Residual 0.05*C: UNet proj_out"))
    return rows


def format_rows(rows: Sequence[Row]) -> str:
    """A fixed-width text table."""
    width = max(len(r.label) for r in rows)
    lines = [f"{'adapter':<{width}}  {'matrices':>8}  {'variables':>10}  {'bytes (f32)':>12}"]
    lines += [f"{r.label:<{width}}  {r.matrices:>8,}  {r.variables:>10,}  {r.bytes_f32:>12,}" for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    from hdb_jax.sd import loading, model  # local: keeps this module light to import

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15", help="sd15, tiny, or a diffusers-format directory")
    parser.add_argument("--lidb_a", type=int, default=100)
    parser.add_argument("--lidb_b", type=int, default=50)
    args = parser.parse_args(argv)
    if args.model == "sd15":
        sd = model.sd15_shapes()
    elif args.model == "tiny":
        sd = tiny_lib.tiny()
    else:
        sd = loading.load_configs(args.model)
    rows = standard_rows(sd.abstract_params(), LiDB(a=args.lidb_a, b=args.lidb_b))
    print(f"model: {sd.name}")
    print(format_rows(rows))


if __name__ == "__main__":
    main()
