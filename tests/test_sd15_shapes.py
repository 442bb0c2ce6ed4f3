"""SD 1.5 adapter counts from shapes only (jax.eval_shape over the shipped configs)."""

import jax
import pytest

from hdb_jax import adapters as A
from hdb_jax.adapters import table
from hdb_jax.sd import model


@pytest.fixture(scope="module")
def sd15_abstract():
    return model.sd15_shapes().abstract_params()


def test_sd15_component_sizes(sd15_abstract):
    sizes = {k: sum(x.size for x in jax.tree_util.tree_leaves(v)) for k, v in sd15_abstract.items()}
    assert sizes == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}


def test_sd15_adapter_counts(sd15_abstract):
    rows = {
        r.label.split(":")[0] + ":" + r.label.split(":")[1]: r for r in table.standard_rows(sd15_abstract)
    }
    lidb = rows["LiDB a=100 b=50 r=1: UNet + text attention"]
    assert (lidb.matrices, lidb.variables, lidb.bytes_f32) == (176, 26_400, 105_600)
    lidb_mlp = rows["LiDB: UNet + text attention + text MLP"]
    assert (lidb_mlp.matrices, lidb_mlp.variables) == (200, 30_000)
    assert rows["Kron (4,64): UNet attention"].variables == 398_048
    assert rows["Kron (8,64): UNet attention"].variables == 248_176
    assert rows["LoRA per unit rank: UNet attention"].variables == 199_296
    # Residual ranks 16/32/64 on the 320/640/1280-channel proj_out layers, one per transformer block.
    residual = rows["Residual 0.05*C: UNet proj_out"]
    assert residual.matrices == 16
    unet = A.Adapter.create(A.Residual(), sd15_abstract["unet"], [A.PATTERNS["unet_proj_out"]], "unet")
    ranks = sorted({A.Residual().layer_rank(t) for t in unet.targets})
    assert ranks == [16, 32, 64]
    assert residual.variables == sum(2 * t.in_dim * A.Residual().layer_rank(t) for t in unet.targets)


def test_sd15_unet_attention_targets(sd15_abstract):
    unet = A.Adapter.create(A.LoRA(rank=1), sd15_abstract["unet"], [A.PATTERNS["unet_attention"]], "unet")
    assert len(unet.targets) == 128
    # Hand count: sum over 16 blocks of q,k,v,out (in+out) with cross-attention k/v from 768.
    blocks = [320] * 2 + [640] * 2 + [1280] * 2 + [1280] + [1280] * 3 + [640] * 3 + [320] * 3
    assert sorted(blocks) == sorted(t.in_dim for t in unet.targets if t.path.endswith("attn1.to_q"))
    hand = sum(4 * 2 * c + 2 * 2 * c + 2 * (768 + c) for c in blocks)  # attn1: 4 x (c+c); attn2: q,out + k,v
    assert hand == unet.num_params() == 199_296
