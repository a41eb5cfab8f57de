"""The CAMs' default layer on timm architectures whose earlier default was not a map of the image
(random weights, no download): ConViT (attention weights ``(1, heads, N, N)`` read as a map), TinyViT
(the last block's MLP branch, before its residual add), MaxViT (the last block's attention sub-block,
channels-last, instead of the stage it hands its output to) and CrossViT (one of two branches, said
nowhere). Each default is checked against Grad-CAM written out by hand on the layer's output.
"""
from __future__ import annotations

import logging
from typing import Callable

import pytest
import torch
from torch import nn

import salience
from salience import SalienceError
from salience.methods.gradcam import default_layer, describe_default_layer

from conftest import unchanged
from hand_cams import assert_each_varies, gradcam_by_hand as by_hand

import timm  # noqa: E402 - in the test extra: tested, never skipped

logging.getLogger("timm").setLevel(logging.ERROR)


def check(net, x, layer, to_grid, target=(1, 3)):
    target = torch.tensor(target)
    assert default_layer(net, x) == layer
    with unchanged(net):
        cam = salience.gradcam(net, x, target)
    ref = by_hand(net, x, layer, target, to_grid)
    assert cam.shape == (len(x), *x.shape[-2:])
    assert_each_varies(ref)
    torch.testing.assert_close(cam, ref, rtol=1e-4, atol=1e-6)


def test_convit_default_is_the_input_of_its_last_attention_not_the_attention_weights():
    """ConViT's attention classes (GPSA, MHSA) are not named ...Attention; their attention weights
    (1, heads, N, N) went through ``attn_drop`` and were read as a (1, K, h, w) map of N x N "pixels". Now a
    module passing on weights (rows summing to 1) counts as attention, and the ViT rule applies: the last
    block's norm1, its class token dropped, 4x4 patches at 64 px."""
    torch.manual_seed(0)
    net = timm.create_model("convit_tiny", pretrained=False, img_size=64, depth=3, local_up_to_layer=2,
                            num_classes=5).eval()
    x = torch.rand(2, 3, 64, 64)
    assert "1 prefix token(s) + a 4x4 grid" in describe_default_layer(net, x)
    check(net, x, "blocks.2.norm1", lambda t: t[:, 1:].reshape(len(t), 4, 4, -1).permute(0, 3, 1, 2))


def test_tiny_vit_default_is_its_last_stage_not_a_blocks_mlp_branch():
    """TinyViT's last stage is one 7x7 window at 224 px, so its window attention looked global and the ViT
    rule took the last (1, 49, C) before it: block 0's ``drop_path2``, the MLP branch before the residual add.
    Its tokens are all patches and the head pools them: the map rule takes the last stage's output."""
    torch.manual_seed(0)
    net = timm.create_model("tiny_vit_5m_224", pretrained=False, num_classes=5).eval()
    x = torch.rand(1, 3, 224, 224)
    check(net, x, "stages", lambda t: t, target=(2,))  # (B, C, 7, 7), channels first as the stage returns it


def test_maxvit_default_is_its_last_stage_output():
    """MaxViT's blocks run their attention channels-last and permute the result back: the stage's output is a
    view of the last ``attn_grid``'s, which the search kept instead of the stage. A block or stage handing
    on its last layer's output in another layout now takes its place."""
    from timm.models.maxxvit import MaxxVit, MaxxVitCfg, _tf_cfg

    torch.manual_seed(0)  # maxvit_tiny_tf_224's layout (its blocks, its NormMlpClassifierHead), made small
    cfg = MaxxVitCfg(embed_dim=(32, 32, 64, 64), depths=(1, 1, 1, 2), block_type=("M",) * 4, stem_width=16,
                     head_hidden_size=64, **_tf_cfg())
    net = MaxxVit(cfg, img_size=64, num_classes=5).eval()
    assert type(net.stages[3].blocks[1].attn_grid).__name__ == "PartitionAttentionCl"  # channels-last inside
    x = torch.rand(2, 3, 64, 64)
    check(net, x, "stages", lambda t: t)  # (B, 64, 2, 2)
    assert "(1, 64, 2, 2): (B, K, h, w)" in describe_default_layer(net, x)


def test_coat_lite_default_is_the_input_of_its_last_factorized_attention():
    """CoaT-Lite's attention (``FactorAttnConvRelPosEnc``: softmax(k)^T v, no (N, N) weights) was not seen as
    attention, so the map rule took ``patch_embed4``, the last stage's input, its two blocks left out. Its
    stages prepend a class token that the head reads alone, so the last block's output tokens get no gradient
    (Grad-CAM there is 0); the ViT rule applies: the last block's norm1, 1 class token + 2x2 patches at 64 px
    (a grid the first embedding's 16x16 halved three times gives, after the class token)."""
    from hand_cams import row_major

    torch.manual_seed(0)
    net = timm.create_model("coat_lite_tiny", pretrained=False, img_size=64, num_classes=5).eval()
    x = torch.rand(2, 3, 64, 64)
    said = describe_default_layer(net, x)
    assert "1 prefix token(s) + a 2x2 grid of patches; the input of the last attention" in said
    check(net, x, "serial_blocks4.1.norm1", row_major(2, 2, prefix=1), target=(0, 3))  # each image's map varies
    assert by_hand(net, x, "serial_blocks4.1", torch.tensor([1, 3]), row_major(2, 2, prefix=1)).abs().max() == 0
    # an earlier stage's tokens read on their grid too, without grid= / prefix_tokens=: 1 + 8x8
    target = torch.tensor([1, 3])
    cam = salience.gradcam(net, x, target, layer="serial_blocks2.1")
    ref = by_hand(net, x, "serial_blocks2.1", target, row_major(8, 8, prefix=1))
    assert_each_varies(ref)  # not 0 = 0 on an image
    torch.testing.assert_close(cam, ref, rtol=1e-4, atol=1e-6)


class _Factorized(nn.Module):
    """A factorized attention as CoaT's (``q @ (softmax(k over the tokens)^T v)``, qkv and output projections),
    under a name of its own."""

    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys, values ``(B, heads, N, d)``."""
        b, n, c = x.shape
        return self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.split(x)
        out = q @ (k.softmax(dim=2).transpose(-1, -2) @ v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class FactorAttnLookalike(nn.Module):
    """Named as CoaT's attention, but a per-token MLP: nothing attends."""

    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class _FactorBlock(nn.Module):
    def __init__(self, dim: int, mixer: type):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), mixer(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.norm1(x))


class _CoaTLike(nn.Module):
    """CoaT-Lite's form, small: a 4x4-patch embedding (8x8 at 32 px), a second stride-2 embedding (4x4), a class
    token prepended, two blocks of ``mixer``, a head reading the class token."""

    def __init__(self, mixer: type, dim: int = 8):
        super().__init__()
        self.embed1, self.embed2 = nn.Conv2d(3, dim, 4, stride=4), nn.Conv2d(dim, dim, 2, stride=2)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = nn.Sequential(_FactorBlock(dim, mixer), _FactorBlock(dim, mixer))
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed2(torch.relu(self.embed1(x))).flatten(2).transpose(1, 2)
        return self.head(self.blocks(torch.cat([self.cls.expand(len(x), -1, -1), t], dim=1))[:, 0])


def assert_spotted_as_by_at(spelled: type) -> None:
    """``spelled``, a :class:`_Factorized` whose forward writes the same products another way, is one model with
    the ``@`` spelling (the same output from the same weights) and takes the same default layer (the input of the
    last factorized attention, ``blocks.1.norm1``)."""
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    by_at = _CoaTLike(_Factorized).eval()
    torch.manual_seed(0)
    other = _CoaTLike(spelled).eval()
    assert torch.equal(by_at(x), other(x))  # one model
    assert default_layer(by_at, x) == "blocks.1.norm1"
    assert default_layer(other, x) == "blocks.1.norm1"


def test_a_factorized_attention_is_recognized_by_what_it_computes_not_by_its_name():
    """CoaT's attention was recognized by its class name (``FactorAttn...``): a user's module computing the same
    ``q @ (softmax(k)^T v)`` under another name was no attention, so the map rule took ``embed2``, before the
    blocks; and a module merely named ``FactorAttn...`` was taken for one. Now the pass's softmax of the keys over
    the tokens, contracted with the values over them, is what counts: the default of the first is the last block's
    norm1 (1 class token + 4x4 patches, fewer than the first embedding's 8x8); the look-alike gets the map rule."""
    from hand_cams import row_major

    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    net = _CoaTLike(_Factorized).eval()
    assert "the input of the last attention" in describe_default_layer(net, x)
    check(net, x, "blocks.1.norm1", row_major(4, 4, prefix=1))
    lookalike = _CoaTLike(FactorAttnLookalike).eval()
    assert default_layer(lookalike, x) == "embed2"


class _FactorizedSoftmaxModule(_Factorized):
    """The same factorized attention with its keys' softmax in an ``nn.Softmax(dim=-2)`` it holds (a submodule);
    ``EINSUM``: ``softmax(k)^T v`` written as ``torch.einsum``, else ``@``."""

    EINSUM = False

    def __init__(self, dim: int, heads: int = 2):
        super().__init__(dim, heads)
        self.softmax = nn.Softmax(dim=-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.split(x)
        if self.EINSUM:
            kv = torch.einsum("bhnk,bhnv->bhkv", self.softmax(k), v)
        else:
            kv = self.softmax(k).transpose(-1, -2) @ v
        return self.proj((q @ kv).transpose(1, 2).reshape(b, n, c))


def test_a_factorized_attention_whose_softmax_is_a_submodule_is_recognized():
    """The keys' softmax run by an ``nn.Softmax`` the attention holds ran in that submodule, not where the matmul
    contracts it with the values, so the attention was not seen and the default was ``blocks.1.attn.softmax``
    (Grad-CAM on the softmaxed keys); now it is the last block's norm1, as with ``k.softmax(dim=2)``."""
    from hand_cams import row_major

    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    net = _CoaTLike(_FactorizedSoftmaxModule).eval()
    assert default_layer(net, x) == "blocks.1.norm1"
    check(net, x, "blocks.1.norm1", row_major(4, 4, prefix=1))


class _EinsumFactorized(_Factorized):
    """:class:`_Factorized` with ``softmax(k)^T v`` written as ``torch.einsum`` (``EQUATION``, ``KEYS_T``: the keys'
    softmax handed over transposed, ``(B, heads, d, N)``; ``LIST``: the operands as one list; ``EQUATION`` None: the
    sublist form)."""

    EQUATION, KEYS_T, VALUES_FIRST, LIST = "bhnk,bhnv->bhkv", False, False, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.split(x)
        keys = k.softmax(dim=-2)
        keys = keys.transpose(-1, -2) if self.KEYS_T else keys
        ops = (v, keys) if self.VALUES_FIRST else (keys, v)
        if self.EQUATION is None:  # the sublist form
            kv = torch.einsum(ops[0], [0, 1, 2, 3], ops[1], [0, 1, 2, 4], [0, 1, 3, 4])
        else:
            kv = torch.einsum(self.EQUATION, list(ops)) if self.LIST else torch.einsum(self.EQUATION, *ops)
        out = torch.einsum("bhnk,bhkv->bhnv", q, kv)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("equation, keys_t, values_first, as_list", [
    ("bhnk,bhnv->bhkv", False, False, False),
    ("bhkn,bhnv->bhkv", True, False, False),  # the keys transposed first, as CoaT's matmul takes them
    ("bhnv,bhnk->bhkv", False, True, False),  # the values first
    ("...nk,...nv->...kv", False, False, True),  # an ellipsis for batch and heads, the operands as a list
    (" b h n k , b h n v -> b h k v ", False, False, False),  # spaces
    (None, False, False, False),  # the sublist form: keys [0, 1, 2, 3], values [0, 1, 2, 4] -> [0, 1, 3, 4]
])
def test_a_factorized_attention_written_with_einsum_is_recognized(equation, keys_t, values_first, as_list):
    """The keys' softmax contracted with the values over the tokens was recognized in ``@`` / ``matmul`` / ``bmm``
    only: the same product written with ``torch.einsum`` was no attention, and the map rule took ``embed2``,
    before the blocks. Now einsum's forms count too: the default is the last block's norm1 (1 class token + 4x4
    patches), Grad-CAM there the hand computation."""
    from hand_cams import row_major

    mixer = type("Mixer", (_EinsumFactorized,), {"EQUATION": equation, "KEYS_T": keys_t,
                                                   "VALUES_FIRST": values_first, "LIST": as_list})
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    net = _CoaTLike(mixer).eval()
    check(net, x, "blocks.1.norm1", row_major(4, 4, prefix=1))


def test_an_einsum_that_does_not_contract_the_keys_over_the_tokens_is_no_attention():
    """The keys' softmax over the tokens in an einsum that keeps the token index (an elementwise product with the
    values, summed over the channels) is no factorized attention: the map rule, ``embed2``."""

    class NotContracted(_Factorized):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, c = x.shape
            q, k, v = self.split(x)
            w = torch.einsum("bhnk,bhnk->bhn", k.softmax(dim=-2), v)
            return self.proj((q * w[..., None]).transpose(1, 2).reshape(b, n, c))

    torch.manual_seed(0)
    assert default_layer(_CoaTLike(NotContracted).eval(), torch.rand(1, 3, 32, 32)) == "embed2"


def test_an_einsum_factorized_attention_whose_softmax_is_a_submodule_is_recognized():
    """The matmul form took a keys' softmax run in a submodule (an ``nn.Softmax(dim=-2)`` the attention holds), the
    einsum form only one run in the attention's own forward: the same attention written with einsum was not seen and
    the default was ``blocks.1.attn.softmax`` (the softmaxed keys). Now both forms take it: the last block's norm1,
    Grad-CAM there the hand computation."""
    from hand_cams import row_major

    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    mixer = type("Mixer", (_FactorizedSoftmaxModule,), {"EINSUM": True})
    check(_CoaTLike(mixer).eval(), x, "blocks.1.norm1", row_major(4, 4, prefix=1))


def test_keys_reshaped_not_transposed_before_a_matmul_are_no_attention():
    """A matmul took any view of the keys' softmax of the transposed shape ``(B, heads, d, N)``, also a reshape,
    which mixes tokens and channels (its rows are no token's keys): not ``softmax(k)^T v``. Only a permutation of
    the softmax's dims counts now (matched by strides): the map rule, ``embed2``, as for a module with no attention."""

    class Reshaped(_Factorized):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, c = x.shape
            q, k, v = self.split(x)
            keys = k.softmax(dim=2)
            assert keys.is_contiguous()  # so the reshape below is a view of the softmax's output
            out = q @ (keys.reshape(b, self.heads, c // self.heads, n) @ v)
            return self.proj(out.transpose(1, 2).reshape(b, n, c))

    torch.manual_seed(0)
    assert default_layer(_CoaTLike(Reshaped).eval(), torch.rand(1, 3, 32, 32)) == "embed2"


def check_as_plain(mixer: type) -> None:
    """``mixer``, another way of writing :class:`_Factorized`, computes what the plain form does (the same weights),
    its default is the plain form's, the last block's norm1, and Grad-CAM there is the hand computation."""
    from hand_cams import row_major

    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    net = _CoaTLike(mixer).eval()
    plain = _CoaTLike(_Factorized).eval()
    plain.load_state_dict(net.state_dict())
    torch.testing.assert_close(net(x), plain(x))  # the same computation as the plain form
    assert default_layer(plain, x) == "blocks.1.norm1"
    check(net, x, "blocks.1.norm1", row_major(4, 4, prefix=1))


class _TransposedFactorized(_Factorized):
    """The factorized attention with the product written the other way round, ``(v^T softmax(k))^T`` (``FORM``:
    ``"matmul"``, ``v.transpose(-2, -1) @ k.softmax(dim=-2)``; ``"einsum"``, ``bhnv,bhnk->bhvk``; ``"einsum3"``: the
    whole ``q (softmax(k)^T v)`` as one einsum of three operands, ``bhnk,bhnv,bhmk->bhmv``)."""

    FORM = "matmul"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.split(x)
        keys = k.softmax(dim=-2)
        if self.FORM == "einsum3":
            out = torch.einsum("bhnk,bhnv,bhmk->bhmv", keys, v, q)
        else:
            vk = v.transpose(-2, -1) @ keys if self.FORM == "matmul" else torch.einsum("bhnv,bhnk->bhvk", v, keys)
            out = q @ vk.transpose(-2, -1)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("form", ["matmul", "einsum", "einsum3"])
def test_a_factorized_attention_written_transposed_or_as_one_einsum_is_recognized(form):
    """``v^T @ softmax(k)`` and ``q (softmax(k)^T v)`` as one einsum of three operands were no attention (a matmul's
    keys had to be its first factor, an einsum to have two operands): the map rule took ``embed2``. Now either
    factor and any number of einsum operands count: the default is that of the plain form, the last block's norm1,
    Grad-CAM there the hand computation; and the model computes what the plain form does. (The einsum
    ``bhnv,bhnk->bhvk`` was already recognized: checked here alongside.)"""
    check_as_plain(type("Mixer", (_TransposedFactorized,), {"FORM": form}))


def test_an_einsum_of_three_operands_that_keeps_the_tokens_is_no_attention():
    """Three operands, the keys' softmax among them, but the token index kept (a per-token gating, ``bhnk,bhnk,
    bhnv->bhnv``): no factorized attention, the map rule, ``embed2``."""

    class Gated(_Factorized):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, c = x.shape
            q, k, v = self.split(x)
            out = torch.einsum("bhnk,bhnk,bhnv->bhnv", k.softmax(dim=-2), q, v)
            return self.proj(out.transpose(1, 2).reshape(b, n, c))

    torch.manual_seed(0)
    assert default_layer(_CoaTLike(Gated).eval(), torch.rand(1, 3, 32, 32)) == "embed2"


class _FoldedFactorized(_Factorized):
    """The factorized attention with the heads folded into the batch or the keys copied before the product
    (``FORM``): ``"bmm"``, ``torch.bmm`` on ``(B * heads, N, d)`` with the keys softmaxed over dim 1 there;
    ``"matmul3"``, ``@`` on the same 3-D tensors; ``"fold"``, the 4-D keys softmaxed, then folded by a reshape (a
    view); ``"contiguous"`` / ``"clone"``, the 4-D keys' softmax transposed and copied before ``@``;
    ``"bmm_contiguous"``, the folded keys transposed and copied by ``.contiguous()`` before ``torch.bmm``;
    ``"split_after"``, the keys ``(B, N, heads * d)`` softmaxed over the tokens before the heads are split (the same
    values: the softmax is per channel)."""

    FORM = "bmm"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h, d = self.heads, c // self.heads
        if self.FORM == "split_after":
            q3, k3, v3 = self.qkv(x).chunk(3, dim=-1)
            q4, k4, v4 = (t.reshape(b, n, h, d).transpose(1, 2) for t in (q3, k3.softmax(dim=1), v3))
            return self.proj((q4 @ (k4.transpose(-1, -2) @ v4)).transpose(1, 2).reshape(b, n, c))
        q4, k4, v4 = self.split(x)
        q, k, v = (t.reshape(b * h, n, d) for t in (q4, k4, v4))  # copies: the heads folded into the batch
        if self.FORM == "bmm":
            out = torch.bmm(q, torch.bmm(k.softmax(dim=1).transpose(1, 2), v))
        elif self.FORM == "matmul3":
            out = q @ (k.softmax(dim=-2).transpose(-1, -2) @ v)
        elif self.FORM == "fold":
            keys = k4.softmax(dim=-2).reshape(b * h, n, d)
            out = torch.bmm(q, torch.bmm(keys.transpose(1, 2), v))
        elif self.FORM == "bmm_contiguous":
            out = torch.bmm(q, torch.bmm(k.softmax(dim=1).transpose(1, 2).contiguous(), v))
        else:
            keys = k4.softmax(dim=-2).transpose(-1, -2)
            keys = keys.contiguous() if self.FORM == "contiguous" else keys.clone()
            out = (q4 @ (keys @ v4)).reshape(b * h, n, d)
        return self.proj(out.reshape(b, h, n, d).transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("form", ["bmm", "matmul3", "fold", "contiguous", "clone", "bmm_contiguous", "split_after"])
def test_a_factorized_attention_with_folded_heads_or_copied_keys_is_recognized(form):
    """The keys' softmax over the tokens counted only as 4-D ``(B, heads, N, d)`` and only as a view of the softmax's
    output: the heads folded into the batch (``torch.bmm`` on ``(B * heads, N, d)``) or keys copied by
    ``.contiguous()`` / ``.clone()`` before the product were no attention, and the map rule took ``embed2``; so were
    keys softmaxed as ``(B, N, heads * d)`` before the heads are split (``split_after``, still so after the first
    fix). Now they count: the default is the plain form's, the last block's norm1, Grad-CAM there the hand
    computation; and the model computes what the plain form does."""
    check_as_plain(type("Mixer", (_FoldedFactorized,), {"FORM": form}))


def test_a_sparse_tensor_copied_after_a_factorized_attention_leaves_the_search_working():
    """Once keys were seen, each ``.clone()`` / ``.contiguous()`` and product operand is compared with them by its
    data pointer: a sparse tensor (no storage) cloned after the attention (a token graph's adjacency) made the search
    fail with torch's RuntimeError ('Cannot access data pointer of Tensor that doesn't have storage'). Now a tensor
    without strided storage is no keys: the default is the plain form's, the last block's norm1."""

    class ThenSparse(_Factorized):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = super().forward(x)
            adj = torch.eye(out.shape[1]).to_sparse().clone()  # a token graph, the identity
            return torch.stack([torch.sparse.mm(adj, o) for o in out])

    torch.manual_seed(0)
    assert default_layer(_CoaTLike(ThenSparse).eval(), torch.rand(1, 3, 32, 32)) == "blocks.1.norm1"


@pytest.mark.parametrize("form", ["per_token_linear", "reshaped", "split_mixed"])
def test_a_bmm_that_does_not_contract_the_keys_over_the_tokens_is_no_attention(form):
    """Keys softmaxed over the tokens with the heads folded into the batch, then a ``torch.bmm`` that is no
    ``softmax(k)^T v``: a per-token linear (the channels contracted, the tokens kept), or the keys reshaped to
    ``(B * heads, d, N)``, which mixes tokens and channels (its rows are no token's keys), or keys ``(B, N, heads *
    d)`` softmaxed over the tokens then reshaped to ``(B * heads, N, d)`` without moving the heads first (its rows
    mix tokens): the map rule, ``embed2``, as for a module with no attention."""

    class NotAttention(_Factorized):
        def __init__(self, dim: int, heads: int = 2):
            super().__init__(dim, heads)
            self.weight = nn.Parameter(torch.randn(dim // heads, dim // heads))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, c = x.shape
            h, d = self.heads, c // self.heads
            q, k, v = (t.reshape(b * h, n, d) for t in self.split(x))
            keys = k.softmax(dim=1)
            if form == "split_mixed":
                keys3 = self.qkv(x).chunk(3, dim=-1)[1].softmax(dim=1)  # (B, N, heads * d), contiguous
                assert keys3.is_contiguous()  # so the reshape below is a view of the softmax's output
                out = torch.bmm(q, torch.bmm(keys3.reshape(b * h, n, d).transpose(1, 2), v))
            elif form == "per_token_linear":
                out = torch.bmm(keys, self.weight.expand(b * h, d, d)) * v
            else:
                assert keys.is_contiguous()  # so the reshape below is a view of the softmax's output
                out = torch.bmm(q, torch.bmm(keys.reshape(b * h, d, n), v))
            return self.proj(out.reshape(b, h, n, d).transpose(1, 2).reshape(b, n, c))

    torch.manual_seed(0)
    assert default_layer(_CoaTLike(NotAttention).eval(), torch.rand(1, 3, 32, 32)) == "embed2"


def test_volo_default_is_its_last_stage_not_its_per_token_class_scores():
    """VOLO's logits are head(norm(x)[:, 0]) + 0.5 * max over the patch tokens of aux_head(norm(x)[:, 1:]). The
    default was aux_head, per-token class scores (1, N, classes): Grad-CAM there is the target's token scores
    alone, ReLU(0.5 / N * s_c) (checked below by that formula), blind to the class token's path. Now per-token
    class scores are no candidate and the map rule takes the last stage's output, network.4, channels-last
    (B, h, w, C) before the class attention (as CaiT's default is its blocks before theirs), whose gradient
    carries both paths."""
    torch.manual_seed(0)
    net = timm.create_model("volo_d1_224", pretrained=False, img_size=64, num_classes=5).eval()
    x, target = torch.rand(2, 3, 64, 64), torch.tensor([1, 3])
    assert "network.4 (Sequential, output (1, 4, 4, 384): channels-last" in describe_default_layer(net, x)
    check(net, x, "network.4", lambda t: t.permute(0, 3, 1, 2))
    # the old default by the closed form: the aux head's scores of the target, 4x4 tokens, scaled by 0.5 / 16
    kept = []
    handle = net.aux_head.register_forward_hook(lambda m, i, o: kept.append(o.detach()))
    with torch.no_grad():
        net(x)
    handle.remove()
    scores = kept[0][torch.arange(2), :, target].reshape(2, 1, 4, 4)
    ref = torch.nn.functional.interpolate((0.5 / 16 * scores).clamp(min=0), size=(64, 64), mode="bilinear",
                                          align_corners=False)[:, 0]
    torch.testing.assert_close(salience.gradcam(net, x, target, layer="aux_head"), ref, rtol=1e-4, atol=1e-7)


def test_crossvit_has_no_default_layer_and_says_what_to_pass():
    """CrossViT embeds the image twice (12- and 16-pixel patches) and its head averages both branches'
    class tokens: the default was branch 0's last norm1, half of the model's evidence, said nowhere. Now a
    refusal naming both embeddings; a branch's layer given by hand is read as asked."""
    torch.manual_seed(0)
    net = timm.create_model("crossvit_tiny_240", pretrained=False, num_classes=5).eval()
    x = torch.rand(1, 3, 240, 240)
    with pytest.raises(SalienceError, match=r"patch_embed\.0\.proj', 'patch_embed\.1\.proj'.*Pass layer="):
        default_layer(net, x)
    with pytest.raises(SalienceError, match="no default layer"):
        salience.gradcam(net, x, 1)
    target = torch.tensor([1])
    cam = salience.gradcam(net, x, target, layer="blocks.2.blocks.0")  # branch 0: class token + 20x20 patches
    ref = by_hand(net, x, "blocks.2.blocks.0", target,
                  lambda t: t[:, 1:].reshape(len(t), 20, 20, -1).permute(0, 3, 1, 2))
    torch.testing.assert_close(cam, ref, rtol=1e-4, atol=1e-6)
    cam = salience.gradcam(net, x, target, layer="blocks.2.blocks.1", grid=(14, 14), prefix_tokens=1)
    ref = by_hand(net, x, "blocks.2.blocks.1", target,
                  lambda t: t[:, 1:].reshape(len(t), 14, 14, -1).permute(0, 3, 1, 2))
    torch.testing.assert_close(cam, ref, rtol=1e-4, atol=1e-6)


def test_crossvits_default_methods_leave_out_the_cams_that_refuse_it():
    """default_methods (what salience demo, evaluate and list --model run or offer) listed the CAMs for
    CrossViT, whose default layer each of them refuses. Now the layer methods are left out where the
    default layer is refused, by the modules alone (two patch embeddings) and with an image; a model that
    names its layer keeps them."""
    import inspect

    from salience.methods import METHODS, default_methods

    LAYER_METHODS = {n for n, f in METHODS.items() if "layer" in inspect.signature(f).parameters}  # the CAMs
    torch.manual_seed(0)
    net = timm.create_model("crossvit_tiny_240", pretrained=False, num_classes=5).eval()
    x = torch.rand(1, 3, 240, 240)
    for name in LAYER_METHODS:  # each refuses the model by default, as the list now says
        with pytest.raises(SalienceError, match="no default layer"):
            salience.METHODS[name](net, x, 1)
    assert not LAYER_METHODS & set(default_methods(net))
    assert not LAYER_METHODS & set(default_methods(net, x))
    assert {"vanilla", "integrated_gradients", "occlusion"} <= set(default_methods(net, x))
    net.salience_default_layer = "blocks.2.blocks.0"
    # but Guided Grad-CAM, whose rule refuses CrossViT's GELU (salience.methods.GUIDED_METHODS)
    named = LAYER_METHODS - {"guided_gradcam"}
    assert named <= set(default_methods(net)) and named <= set(default_methods(net, x))
    assert "guided_gradcam" not in set(default_methods(net)) | set(default_methods(net, x))


def test_layer_methods_are_those_with_a_layer_option():
    import inspect

    from salience.methods import LAYER_METHODS, METHODS

    assert LAYER_METHODS == {n for n, f in METHODS.items() if "layer" in inspect.signature(f).parameters}


def test_list_says_crossvits_cams_need_a_layer(capsys):
    from salience.cli import main

    assert main(["list", "--model", "timm:crossvit_tiny_240", "--weights", "random"]) == 0
    out = capsys.readouterr().out
    assert "Grad-CAM layer none (the model embeds the image in patches 2 times" in out
    line = next(line for line in out.splitlines() if "methods that apply" in line)
    run, _, named = line.partition("; with --layer also: ")
    assert "vanilla" in run and "gradcam" not in run and "scorecam" not in run
    assert named.split(", ") == ["gradcam", "guided_gradcam", "gradcam_plus_plus", "hirescam", "xgradcam", "layercam",
                                 "eigencam", "scorecam", "ablationcam"]


def test_coat_with_parallel_blocks_has_no_default_layer_and_says_what_to_pass():
    """Non-lite CoaT's parallel blocks attend over three scales side by side (1 + 8x8, 1 + 4x4, 1 + 2x2 tokens at
    64 px) and its head combines the three class tokens (``aggregate``): the default was the last block's
    ``norm14``, the smallest scale's stream alone, said only in the docs. Now, as for CrossViT's branches, a
    refusal naming the three streams' norms; each given by hand is read as asked (= the hand computation), and
    default_methods leaves the CAMs out."""
    from hand_cams import row_major
    from salience.methods import LAYER_METHODS, default_methods

    torch.manual_seed(0)
    net = timm.create_model("coat_tiny", pretrained=False, img_size=64, num_classes=5).eval()
    x, target = torch.rand(2, 3, 64, 64), torch.tensor([0, 3])  # each image's map varies on both streams
    streams = (r"'parallel_blocks\.5\.norm12' \(1 prefix token\(s\) \+ 8x8 patches\), 'parallel_blocks\.5\.norm13' "
               r"\(1 prefix token\(s\) \+ 4x4 patches\), 'parallel_blocks\.5\.norm14' \(1 prefix token\(s\) \+ 2x2")
    with pytest.raises(SalienceError, match=r"3 token streams of different lengths.*no default layer.*Pass layer= the stream to map, e.g. the input of its "
                                            r"attention: "
                                            + streams):
        default_layer(net, x)
    with pytest.raises(SalienceError, match="no default layer"):
        salience.gradcam(net, x, target)
    for layer, side in (("parallel_blocks.5.norm12", 8), ("parallel_blocks.5.norm14", 2)):
        with unchanged(net):
            cam = salience.gradcam(net, x, target, layer=layer)
        ref = by_hand(net, x, layer, target, row_major(side, side, prefix=1))
        assert_each_varies(ref)
        torch.testing.assert_close(cam, ref, rtol=1e-4, atol=1e-6)
    assert not LAYER_METHODS & set(default_methods(net, x))


class _PooledStages(torch.nn.Module):
    """Two attentions one after the other, kept in one nn.ModuleList: 1 + 8x8 tokens, then the patches
    average-pooled to 4x4 (1 + 4x4 tokens). Not CoaT's streams side by side: nothing calls the list."""

    class Attention(torch.nn.Module):
        def __init__(self, d: int):
            super().__init__()
            self.qkv, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self.qkv(x).chunk(3, -1)
            return self.proj((q @ k.transpose(-2, -1) / 4).softmax(-1) @ v)

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, stride=4, padding=1)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, 16))
        self.norms = torch.nn.ModuleList([torch.nn.LayerNorm(16), torch.nn.LayerNorm(16)])
        self.attns = torch.nn.ModuleList([self.Attention(16), self.Attention(16)])
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.stem(x)
        b = p.shape[0]
        t = torch.cat([self.cls.expand(b, -1, -1), p.flatten(2).transpose(1, 2)], 1)
        t = t + self.attns[0](self.norms[0](t))
        g = torch.nn.functional.avg_pool2d(t[:, 1:].transpose(1, 2).reshape(b, 16, 8, 8), 2).flatten(2).transpose(1, 2)
        t = torch.cat([t[:, :1], g], 1)
        t = t + self.attns[1](self.norms[1](t))
        return self.head(t[:, 0])


def test_attentions_in_one_module_list_run_one_after_the_other_not_side_by_side():
    """Attentions kept in one nn.ModuleList, tokens pooled between them (65, then 17 tokens): they were taken
    for CoaT's parallel streams (same parent name) and the default refused; a ModuleList is never called, so
    they run one after the other: the default is the last attention's input, ``norms.1``, and Grad-CAM there is
    the hand computation on 1 + 4x4 tokens (``prefix_tokens=1``: 17 tokens read two ways without it)."""
    from hand_cams import row_major

    torch.manual_seed(0)
    net = _PooledStages().eval()
    x, target = torch.rand(2, 3, 32, 32), torch.tensor([1, 2])  # each image's map varies
    assert default_layer(net, x) == "norms.1"
    with unchanged(net):
        cam = salience.gradcam(net, x, target, prefix_tokens=1)  # no patch embedding; the pooling is functional
    ref = by_hand(net, x, "norms.1", target, row_major(4, 4, prefix=1))
    assert_each_varies(ref)
    torch.testing.assert_close(cam, ref, rtol=1e-4, atol=1e-6)


def test_default_methods_on_a_cnn_run_one_forward_pass():
    """default_methods(model, x) on a CNN ran 3 forward passes: attention rollout (refused: no attention), the
    default-layer search, and one more pass for the default layer's output. Now the search's pass serves the
    layer's output, and it saw no attention operation or module, so rollout is not run: one pass; the attention
    methods left out, the layer methods kept."""
    from salience.methods import ATTENTION_METHODS, LAYER_METHODS, default_methods

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1),
                              torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    count = [0]
    handle = net.register_forward_pre_hook(lambda *a: count.__setitem__(0, count[0] + 1))
    try:
        methods = default_methods(net, torch.rand(1, 3, 16, 16))
    finally:
        handle.remove()
    assert count[0] == 1
    assert LAYER_METHODS <= set(methods) and not ATTENTION_METHODS & set(methods)


class _PoolTokens(torch.nn.Module):
    """The patch tokens (1 + 8x8) average-pooled 2x2 (1 + 4x4), the class token kept."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        b, n, d = t.shape
        side = int((n - 1) ** 0.5)
        g = torch.nn.functional.avg_pool2d(t[:, 1:].transpose(1, 2).reshape(b, d, side, side), 2)
        return torch.cat([t[:, :1], g.flatten(2).transpose(1, 2)], 1)


class _SequentialStage(torch.nn.Module):
    """One called module holding two attentions as attributes, run one AFTER the other with pooling between them:
    ``attn2``'s input is computed from ``attn1``'s output."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.norm1, self.attn1 = torch.nn.LayerNorm(d), _PooledStages.Attention(d)
        self.pool = _PoolTokens()
        self.norm2, self.attn2 = torch.nn.LayerNorm(d), _PooledStages.Attention(d)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t = self.pool(t + self.attn1(self.norm1(t)))
        return t + self.attn2(self.norm2(t))


class _CalledStage(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, stride=4, padding=1)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, 16))
        self.stage = _SequentialStage(16)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.stem(x)
        t = torch.cat([self.cls.expand(len(x), -1, -1), p.flatten(2).transpose(1, 2)], 1)
        return self.head(self.stage(t)[:, 0])


def test_attentions_one_after_the_other_in_one_called_module_are_not_side_by_side():
    """A called module holding two attentions as attributes, run in sequence with pooling between them (65, then
    17 tokens): the structure alone (attentions of one called parent, finishing within its call) took them for
    CoaT's parallel streams and refused the default with a misleading message. Now the pass's data flow decides:
    ``attn2``'s input is computed from ``attn1``'s output, so they are one stream; the default is ``attn2``'s input,
    ``stage.norm2``, and Grad-CAM there is the hand computation on 1 + 4x4 tokens."""
    from hand_cams import row_major

    torch.manual_seed(0)
    net = _CalledStage().eval()
    x, target = torch.rand(2, 3, 32, 32), torch.tensor([1, 2])
    assert default_layer(net, x) == "stage.norm2"
    with unchanged(net):
        cam = salience.gradcam(net, x, target, prefix_tokens=1)
    ref = by_hand(net, x, "stage.norm2", target, row_major(4, 4, prefix=1))
    assert_each_varies(ref)
    torch.testing.assert_close(cam, ref, rtol=1e-4, atol=1e-6)


class _CheckpointedStage(_CalledStage):
    """:class:`_CalledStage` with its stage run in a reentrant ``torch.utils.checkpoint`` (as timm's
    ``set_grad_checkpointing()`` with reentrant checkpoints, Hugging Face's ``gradient_checkpointing_enable()``): the
    stage runs under ``no_grad`` in the forward pass, so its modules' outputs there have no autograd graph."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.stem(x)
        t = torch.cat([self.cls.expand(len(x), -1, -1), p.flatten(2).transpose(1, 2)], 1)
        return self.head(torch.utils.checkpoint.checkpoint(self.stage, t, use_reentrant=True)[:, 0])


def checkpointed_twins() -> tuple[nn.Module, nn.Module]:
    """A :class:`_CheckpointedStage` and its twin without the checkpoint, :class:`_CalledStage`, the same weights."""
    torch.manual_seed(0)
    net = _CheckpointedStage().eval()
    plain = _CalledStage().eval()
    plain.load_state_dict(net.state_dict())
    return net, plain


def test_attentions_one_after_the_other_inside_a_reentrant_checkpoint_are_not_side_by_side():
    """Inside a reentrant checkpoint the traced pass had no autograd graph, so the data-flow check could not tell
    ``attn2``'s input computed from ``attn1``'s output and fell back to the structure: the default was refused as
    parallel token streams (wrong: the same model without the checkpoint has its default). The traced pass now runs a
    reentrant checkpoint's function as a plain call (the same values, with a graph): the default is ``stage.norm2``,
    as without the checkpoint, and the model and torch's checkpoint come back as they were."""
    from torch.utils.checkpoint import CheckpointFunction

    net, plain = checkpointed_twins()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(net(x), plain(x))
    with unchanged(net):
        assert default_layer(net, x) == default_layer(plain, x) == "stage.norm2"
    assert "apply" not in CheckpointFunction.__dict__  # torch's own Function.apply again
    x.requires_grad_(True)  # the checkpoint still recomputes in the backward pass
    net(x)[:, 1].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


class _KeysSubsampledMixer(nn.Module):
    """Attention under a name of its own: ``softmax(q k^T / sqrt(d)) v`` written out, every token a query, the keys and
    values from every other token (``(1, heads, N, ceil(N / 2))`` weights, as a sub-sampled attention's)."""

    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        self.heads, self.q, self.kv, self.proj = heads, nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(x[:, ::2]).reshape(b, -1, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(dim=-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, c))


class FakeAttention(nn.Module):
    """Named as an attention, but a per-token MLP: nothing attends."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class _MixerBlock(nn.Module):
    def __init__(self, dim: int, mlp: type):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = nn.LayerNorm(dim), _KeysSubsampledMixer(dim), nn.LayerNorm(dim), mlp(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _MixerViT(nn.Module):
    """A ViT, small: 4x4 patches of 16 px (a 4x4 grid), a class token, two blocks of :class:`_KeysSubsampledMixer`
    and an MLP of class ``mlp``, a head reading the class token."""

    def __init__(self, mlp: type, dim: int = 8):
        super().__init__()
        self.embed, self.cls = nn.Conv2d(3, dim, 4, stride=4), nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = nn.Sequential(_MixerBlock(dim, mlp), _MixerBlock(dim, mlp))
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(torch.cat([self.cls.expand(len(x), -1, -1), t], dim=1))[:, 0])


def test_attention_is_recognized_by_what_it_computes_not_by_its_class_name():
    """A module counted as attention by its class name (``...Attention``) or, under another name, only where its
    weights were square: a ``Mixer`` computing ``softmax(q k^T) v`` with sub-sampled keys was no attention, so the map
    rule took ``embed`` (before the blocks), while a per-token MLP named ``FakeAttention`` was taken for one (the
    default was its input, ``blocks.1.norm2``). Now what the pass computes decides: attention weights over the keys
    that every token queries, a class token among them; the default is the last block's ``norm1``, Grad-CAM there the
    hand computation; the same model with a plain MLP class gets the same default."""
    from hand_cams import row_major

    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16)
    net = _MixerViT(FakeAttention).eval()
    plain = _MixerViT(type("Mlp", (FakeAttention,), {})).eval()
    plain.load_state_dict(net.state_dict())
    assert default_layer(plain, x) == "blocks.1.norm1"
    check(net, x, "blocks.1.norm1", row_major(4, 4, prefix=1))


def test_overlapping_traced_passes_put_torchs_checkpoint_back():
    """Two traced passes overlapping out of order (threads: A enters, B enters, A leaves, B leaves) each put back what
    they found on entering, so B put back A's plain call and reentrant checkpoints stayed plain for good (no memory
    saving, in the user's training too). Now the swap is counted: torch's own ``apply`` is back when the last leaves."""
    from torch.utils.checkpoint import CheckpointFunction

    from salience._core.checkpoints import plain_checkpoints as _plain_checkpoints

    a, b = _plain_checkpoints(), _plain_checkpoints()
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    assert "apply" in CheckpointFunction.__dict__  # B still runs plainly
    b.__exit__(None, None, None)
    assert "apply" not in CheckpointFunction.__dict__


def test_gradcam_at_a_layer_inside_a_reentrant_checkpoint_is_the_hand_computation():
    """A layer inside a reentrant checkpoint has no gradient in the forward pass (the checkpoint runs it under
    ``no_grad`` and recomputes it in the backward pass): Grad-CAM there failed with torch's RuntimeError ('One of the
    differentiated Tensors does not require grad'). The CAMs' passes now run such a checkpoint's function as a plain
    call: Grad-CAM at the default, ``stage.norm2``, is the hand computation on the same model without the checkpoint,
    and the model and torch's checkpoint come back as they were."""
    from torch.utils.checkpoint import CheckpointFunction

    from hand_cams import row_major

    net, plain = checkpointed_twins()
    x, target = torch.rand(2, 3, 32, 32), torch.tensor([1, 2])
    with unchanged(net):
        cam = salience.gradcam(net, x, target, prefix_tokens=1)
        # no ReLU in this model: the guided rule's map is the plain gradient's, taken with unsupported="ignore"
        guided = salience.guided_gradcam(net, x, target, prefix_tokens=1, reduce=None, unsupported="ignore")
    ref = by_hand(plain, x, "stage.norm2", target, row_major(4, 4, prefix=1))
    assert_each_varies(ref)
    torch.testing.assert_close(cam, ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(guided, salience.guided_gradcam(plain, x, target, prefix_tokens=1, reduce=None,
                                                               unsupported="ignore"))
    assert "apply" not in CheckpointFunction.__dict__


def _checkpointed_tanh(f: Callable, lin: nn.Module, reentrant: bool) -> torch.Tensor:
    """``f`` (``tanh(lin(t))``) in a ``torch.utils.checkpoint`` on a fresh input, then a backward pass through it: its
    output and the input's gradient checked against those of ``tanh(lin(x))`` without the checkpoint."""
    x = torch.rand(3, 4, requires_grad=True)
    out = torch.utils.checkpoint.checkpoint(f, x, use_reentrant=reentrant)
    out.sum().backward()
    ref = torch.tanh(lin(x))
    (g,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, g)
    return out


def test_plain_checkpoints_leave_other_threads_checkpoints_as_torchs():
    """The swap of torch's ``CheckpointFunction.apply`` is process-wide, so while a search or a CAM ran in one thread,
    a reentrant checkpoint in another (the user's training) ran as a plain call too: no recomputation, the memory
    saving gone. Now only the threads inside ``_plain_checkpoints`` run plainly: another thread's checkpoint is torch's
    (its function under ``no_grad``, its output's node torch's ``CheckpointFunctionBackward``), the same values and
    input gradient as without the swap, and in the swapping thread the function runs with a graph."""
    import threading

    from torch.utils.checkpoint import CheckpointFunction

    from salience._core.checkpoints import plain_checkpoints as _plain_checkpoints

    lin = nn.Linear(4, 4)
    seen: dict = {}

    def f(t: torch.Tensor) -> torch.Tensor:
        seen.setdefault(threading.get_ident(), torch.is_grad_enabled())  # the first pass (not the recomputation)
        return torch.tanh(lin(t))

    def run() -> str:
        return type(_checkpointed_tanh(f, lin, reentrant=True).grad_fn).__name__

    other: dict = {}
    with _plain_checkpoints():
        assert run() != "CheckpointFunctionBackward" and seen[threading.get_ident()] is True
        worker = threading.Thread(target=lambda: other.update(node=run(), ident=threading.get_ident()))
        worker.start()
        worker.join()
    assert other["node"] == "CheckpointFunctionBackward"
    assert seen[other["ident"]] is False  # torch's reentrant checkpoint: the first pass under no_grad
    assert "apply" not in CheckpointFunction.__dict__


def test_plain_checkpoints_run_this_threads_non_reentrant_checkpoints_plainly_and_leave_other_threads():
    """Inside ``_plain_checkpoints`` a non-reentrant checkpoint of this thread runs its function once (a plain call,
    nothing recomputed in the backward pass); in another thread meanwhile it is torch's (the function run again in
    the backward pass); the values and input gradients are those without a checkpoint, and torch's own functions
    come back after the block."""
    import collections
    import threading

    from torch.utils import checkpoint as ck

    from salience._core.checkpoints import _NON_REENTRANT
    from salience._core.checkpoints import plain_checkpoints as _plain_checkpoints

    torch_own = [getattr(ck, name, None) for name in _NON_REENTRANT]
    lin = nn.Linear(4, 4)
    calls: collections.Counter = collections.Counter()

    def f(t: torch.Tensor) -> torch.Tensor:
        calls[threading.get_ident()] += 1
        return torch.tanh(lin(t))

    def run() -> None:
        _checkpointed_tanh(f, lin, reentrant=False)

    other: list = []
    with _plain_checkpoints():
        run()
        worker = threading.Thread(target=lambda: (run(), other.append(threading.get_ident())))
        worker.start()
        worker.join()
    assert calls[threading.get_ident()] == 1 and calls[other[0]] == 2  # torch's: recomputed in the backward pass
    assert [getattr(ck, name, None) for name in _NON_REENTRANT] == torch_own


def test_input_gradient_methods_through_a_reentrant_checkpoint_are_the_plain_models():
    """Only the CAMs' passes ran reentrant checkpoints plainly: the input-gradient methods (vanilla, integrated
    gradients, transformer attribution: every pass of the engine's ``backward``) failed on a model with a reentrant
    checkpoint with torch's RuntimeError ('torch.utils.checkpoint is incompatible with .grad()'), e.g. timm's ViTs
    after ``set_grad_checkpointing()`` with reentrant checkpoints. Now the engine's pass runs them plainly: vanilla is
    d score / d x by hand on the same model without the checkpoint, integrated gradients the twin's, and torch's
    checkpoint comes back."""
    from torch.utils.checkpoint import CheckpointFunction

    net, plain = checkpointed_twins()
    x, target = torch.rand(2, 3, 32, 32), torch.tensor([1, 2])
    with unchanged(net):
        grad = salience.vanilla(net, x, target, reduce=None)
        ig = salience.integrated_gradients(net, x, target, steps=4)
    xr = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(plain(xr).gather(1, target[:, None]).sum(), xr)
    assert ref.abs().sum() > 0
    torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ig, salience.integrated_gradients(plain, x, target, steps=4), rtol=1e-4, atol=1e-6)
    assert "apply" not in CheckpointFunction.__dict__


class _ReLUNet(nn.Module):
    """Two conv-ReLU layers (``CHECKPOINT``: in a non-reentrant ``torch.utils.checkpoint``), pooled, a linear head."""

    CHECKPOINT = False

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.CHECKPOINT:
            return self.head(torch.utils.checkpoint.checkpoint(self.body, x, use_reentrant=False).mean((2, 3)))
        return self.head(self.body(x).mean((2, 3)))


@pytest.mark.parametrize("method", ["deconvnet", "guided_backprop"])
def test_backprop_rules_through_a_non_reentrant_checkpoint_are_the_plain_models(method):
    """A non-reentrant checkpoint recomputes its function in the backward pass, outside the backprop rule entered
    around the forward pass: the rule's backward then read tensors of the plain function, and deconvnet failed with
    torch's ``CheckpointError`` ('Recomputed values ... have different metadata'). Salience's passes now run
    non-reentrant checkpoints as plain calls, as reentrant ones: the maps are those of the same weights without the
    checkpoint (guided backprop checked alongside), and the model and torch's checkpoint come back as they were."""
    torch.manual_seed(0)
    plain, net = _ReLUNet().eval(), type("Checkpointed", (_ReLUNet,), {"CHECKPOINT": True})().eval()
    net.load_state_dict(plain.state_dict())
    x, target = torch.rand(2, 3, 16, 16), torch.tensor([1, 3])
    with unchanged(net):
        got = getattr(salience, method)(net, x, target)
    ref = getattr(salience, method)(plain, x, target)
    assert_each_varies(ref)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-8)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_deconvnet_through_torch_distributeds_composable_checkpoint_is_the_plain_models():
    """torch.distributed's composable ``checkpoint(module)`` (FSDP2's activation checkpointing) is non-reentrant and
    imports torch's set-up function by name, so swapping it in ``torch.utils.checkpoint`` never reached it: its block
    was recomputed in the backward pass outside deconvnet's rule and torch failed with its ``CheckpointError``
    ('Recomputed values ... have different metadata'), not even a SalienceError. Its module's name is swapped too
    now: the map is that of the same weights without the checkpoint, and the model and torch's function come back."""
    from torch.distributed._composable import checkpoint as composable_checkpoint
    from torch.distributed._composable import checkpoint_activation

    torch_own = checkpoint_activation._checkpoint_without_reentrant_generator_impl
    torch.manual_seed(0)
    plain, net = _ReLUNet().eval(), _ReLUNet().eval()
    net.load_state_dict(plain.state_dict())
    composable_checkpoint(net.body)
    x, target = torch.rand(2, 3, 16, 16), torch.tensor([1, 3])
    with unchanged(net):
        got = salience.deconvnet(net, x, target)
    ref = salience.deconvnet(plain, x, target)
    assert_each_varies(ref)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-8)
    assert checkpoint_activation._checkpoint_without_reentrant_generator_impl is torch_own


@torch.library.custom_op("salience_tests::opaque_attention", mutates_args=())
def _opaque_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` as one custom op, as xformers' ``memory_efficient_attention`` or flash-attention
    are: the ops inside it run below the dispatcher, where no ``TorchFunctionMode`` sees them."""
    return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, -1) @ v


@_opaque_attention.register_fake
def _(q, k, v):
    return torch.empty_like(q)


def _opaque_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _opaque_backward(ctx, g):
    with torch.enable_grad():
        q, k, v = (t.detach().requires_grad_(True) for t in ctx.saved_tensors)
        out = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, -1) @ v
        return torch.autograd.grad(out, (q, k, v), g)


_opaque_attention.register_autograd(_opaque_backward, setup_context=_opaque_setup)


class MemEffAttention(_Factorized):
    """DINOv2's name for its xformers attention: the attention runs in one opaque op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.split(x)
        return self.proj(_opaque_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


def test_attention_in_an_opaque_op_under_an_attention_class_name_is_still_attention():
    """Since attention is recognized by the ops the pass runs, an attention computed in one op no mode sees (xformers'
    ``memory_efficient_attention`` in DINOv2's ``MemEffAttention``, flash-attention kernels) was no attention at all:
    the default went from ``blocks.1.norm1`` to ``embed``, before every block. A module named ``...Attention`` in
    which no attention op was seen now counts as attention when its class token's output reads the other tokens
    (the gradient of its first output token reaches other input tokens): a per-token MLP so named still does not
    (``test_attention_is_recognized_by_what_it_computes_not_by_its_class_name``). Default ``blocks.1.norm1``, Grad-CAM
    there the hand computation."""
    from hand_cams import row_major

    torch.manual_seed(0)
    net = _MixerViT(type("Mlp", (FakeAttention,), {})).eval()
    for block in net.blocks:
        block.attn = MemEffAttention(8)
    check(net, torch.rand(2, 3, 16, 16), "blocks.1.norm1", row_major(4, 4, prefix=1))
