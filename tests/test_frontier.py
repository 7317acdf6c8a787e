"""Issue 10's switches: each changes the computation when on, is the old computation when off, and keeps shapes."""
import numpy as np
import pytest
import torch

import train_gpt as T

TINY = dict(PRESET="tiny", MODEL_DIM="64", NUM_LAYERS="3", NUM_HEADS="4", NUM_KV_HEADS="2", BIGRAM_DIM="16",
            VE_DIM="16", VOCAB_SIZE="64")


def model(**env) -> T.GPT:
    torch.manual_seed(0)
    m = T.GPT(T.load_hparams({**TINY, **{k: str(v) for k, v in env.items()}}))
    with torch.no_grad():  # zero-initialized projections would hide what a switch changes
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def two_docs(seed: int, n_a: int = 20, n_b: int = 30) -> torch.Tensor:
    """[BOS, document A (seeded), BOS, document B (fixed)] as one row."""
    a = torch.randint(4, 64, (n_a,), generator=torch.Generator().manual_seed(seed))
    b = torch.randint(4, 64, (n_b,), generator=torch.Generator().manual_seed(99))
    return torch.cat((torch.tensor([T.BOS_ID]), a, torch.tensor([T.BOS_ID]), b))[None]


@torch.no_grad()
def test_document_logits_ignore_the_previous_document_with_doc_mask():
    x, y = two_docs(1), two_docs(2)
    m = model(DOC_MASK=1)
    start = 21  # document B's BOS
    assert torch.allclose(m(x)[0, start:], m(y)[0, start:], atol=1e-5)
    m_off = model(DOC_MASK=0)  # without the mask the second document sees the first
    assert not torch.allclose(m_off(x)[0, start:], m_off(y)[0, start:], atol=1e-3)
    assert torch.equal(m_off(x), model()(x))  # off is the default computation


@torch.no_grad()
def test_smeargate_and_bigram_never_reach_across_a_bos():
    m = model(DOC_MASK=1, BIGRAM_BUCKETS=64)
    x, y = two_docs(1), two_docs(2)
    y[0, 20] = (x[0, 20] + 1 - 4) % 60 + 4  # only the last token before document B's BOS differs
    assert torch.allclose(m(x)[0, 21:], m(y)[0, 21:], atol=1e-5)
