"""Per-token cross-attention maps (DAAM: Tang et al. 2022, "What the DAAM: Interpreting Stable
Diffusion Using Cross Attention", sec. 3).

Every cross-attention layer (attn2) of the UNet computes, per head, the probabilities

    A = softmax(Q K^T / sqrt(d))              [B, heads, N, L]   (N = h_l * w_l pixels, L tokens)

of each latent pixel attending to each text token. DAAM's map of token j (sec. 3, eq. 3-4) sums
them over heads, upsamples each layer's map from its own h_l x w_l to the latent size h x w
(bicubic: here torch's bicubic, a = -0.75, align_corners=False, written out below as two matrices)
and clamps at 0 (bicubic overshoots), then sums over the layers and the denoising steps:

    D_j = sum_steps sum_layers max(0, up(sum_heads A[:, :, :, j]))      [B, h, w]

Usage::

    maps = AttentionMaps()                       # steps=None, resolutions=None: all of them
    image = pipe.txt2img(prompt, attention_maps=maps)
    maps.token_maps()                            # float32 [B, L, h, w]; L = 77 (77 k for long prompts)
    maps.tokens(pipe, prompt)                    # ["<|startoftext|>", "a</w>", ..., "<|endoftext|>"]
    maps.word_maps(pipe, prompt)                 # {"a": [B, h, w], "red": ..., ...}

With guidance the UNet sees the batch [uncond, cond]; only the conditional half is kept. The maps
are sums, not normalised (DAAM's figures normalise each map to [0, 1] for display). Memory: one
running sum [B, L, h, w]; no step's or layer's map is kept. When no collector is active, the UNet
does no extra work (one `is None` test per attention call); when one is, the probabilities are
computed beside the UNet's own attention from the same Q and K, so the images do not change.
"""

import numpy as np

from . import nn
from . import unet as unet_model
from .errors import InputError


class AttentionMaps:
    """Collects DAAM's per-token maps during one generation (pass it as ``attention_maps=``).

    steps: the step indices to keep (0-based, as the sampler callback's ``step``; img2img and
        inpaint start at their strength's start index); None: all.
    resolutions: which layer groups to keep, by their map size in latent pixels: an int (the map's
        height h_l, e.g. 64, 32, 16, 8 for SD v1.x at 512 x 512) or a pair (h_l, w_l); None: all.
    A collector sums over every generation it is passed to; make a new one per image.
    """

    def __init__(self, steps=None, resolutions=None):
        if steps is not None and (isinstance(steps, (str, bytes)) or not hasattr(steps, "__iter__")):
            raise InputError(f"steps must be a list of 0-based step indices or None (every step), got {steps!r}")
        self.steps = None if steps is None else {int(s) for s in steps}
        self.resolutions = None if resolutions is None else {_as_size(r) for r in resolutions}
        self.layers_added = 0          # cross-attention layer calls summed (over steps)
        self.steps_added = set()       # the step indices that contributed
        self._sum = None               # float32 [B, L, h, w], allocated at the first layer
        self._batch = None             # B: the conditional batch
        self._size = None              # (h, w): the latent size
        self._step = None              # the step running now

    # --- results ---------------------------------------------------------------------------------

    def token_maps(self):
        """-> float32 [B, L, h, w]: token j's map for batch item b at [b, j] (all zero for no layer)."""
        if self._sum is None:
            raise InputError("no attention maps were collected: pass this object as attention_maps= to "
                             "txt2img/img2img/inpaint (and check its steps= and resolutions=)")
        return self._sum.copy()

    def tokens(self, pipe, prompt):
        """The token strings of `prompt`, one per position of token_maps()'s L axis up to the last
        end token ("<|startoftext|>", the words' BPE tokens, a word's last one ending in "</w>",
        "<|endoftext|>"). For prompts given as plain text (A1111 emphasis brackets would shift them)."""
        ids = self._ids(pipe, prompt)
        return [_token_string(pipe.tokenizer, i) for i in ids]

    def word_maps(self, pipe, prompt):
        """-> {word: float32 [B, h, w]}: each word's map, the sum of its tokens' maps (a word split into
        several BPE tokens sums them); a word appearing twice gets the sum of both. Start/end tokens
        are left out."""
        maps = self.token_maps()                                             # [B, L, h, w]
        tok = pipe.tokenizer
        special = {tok.bos_id, tok.eos_id, tok.pad_id}
        ids = self._ids(pipe, prompt)
        words, group = {}, []
        for pos, i in enumerate(ids):
            if i in special:
                continue
            group.append(pos)
            if _token_string(tok, i).endswith("</w>"):                       # the word's last token
                word = tok.decode([ids[p] for p in group])
                words[word] = words.get(word, 0) + maps[:, group].sum(axis=1)  # [B, h, w]
                group = []
        return words

    def _ids(self, pipe, prompt):
        if not isinstance(prompt, str):
            raise InputError("tokens()/word_maps() take one prompt (a str); for a batch of prompts, call "
                             "them per prompt and take its rows of token_maps()")
        length = self.token_maps().shape[1]
        ids = pipe.tokenizer.chunked(prompt, num_chunks=max(1, length // 77))[0]   # [L]
        # up to the last 77-token window's end token (after it: padding, which is the end token too)
        window = (len(ids) - 1) // 77 * 77
        last = window + int(np.argmax(ids[window:] == pipe.tokenizer.eos_id))
        return [int(i) for i in ids[:last + 1]]

    # --- collection (called by the pipeline and the UNet) ----------------------------------------

    def watch(self, model, callback, latent_shape, start):
        """The pipeline's hook: model(x, t) and callback(i, t, x, x0_pred) wrapped so that the UNet
        reports to this collector during the selected steps. latent_shape [B, C, h, w]; start: the
        first step's index."""
        self._batch, self._size = latent_shape[0], tuple(latent_shape[2:])
        self._step = start

        def watched_model(x, t):
            if self.steps is not None and self._step not in self.steps:
                return model(x, t)
            before, unet_model._collector = unet_model._collector, self
            try:
                return model(x, t)
            finally:
                unet_model._collector = before

        def watched_callback(i, t, x, x0_pred):
            self._step = i + 1                                               # the next step's index
            return callback(i, t, x, x0_pred) if callback is not None else None
        return watched_model, watched_callback

    def record(self, q, k, heads):
        """Add one cross-attention layer: q [b, N, C] queries, k [b, L, C] keys (b = B, or 2B with the
        batch [uncond, cond]: the second half is taken)."""
        b = q.shape[0]
        if b == 2 * self._batch:
            q, k = q[self._batch:], k[self._batch:]                          # the conditional half
        elif b != self._batch:
            raise InputError(f"attention maps: a UNet batch of {b} for {self._batch} images (a prompt with AND runs "
                             "the UNet once per part); map a prompt without AND")
        hl, wl = _layer_size(q.shape[1], self._size)
        if self.resolutions is not None and (hl, wl) not in self.resolutions and (hl, None) not in self.resolutions:
            return
        bsz, n, c = q.shape
        m, d = k.shape[1], c // heads
        qh = q.reshape(bsz, n, heads, d).transpose(0, 2, 1, 3)               # [B, heads, N, d]
        kt = k.reshape(bsz, m, heads, d).transpose(0, 2, 3, 1)               # [B, heads, d, L]
        # A = softmax(Q K^T / sqrt(d)): [B, heads, N, L]; N x L per head, small beside N x N of attn1
        probs = nn.softmax((qh * np.float32(1.0 / np.sqrt(d))) @ kt, axis=-1)
        a = probs.sum(axis=1).transpose(0, 2, 1).reshape(bsz, m, hl, wl)      # sum heads: [B, L, h_l, w_l]
        up = upsample_bicubic(a, self._size)                                 # [B, L, h, w]
        np.maximum(up, 0, out=up)                                            # bicubic overshoot, as DAAM
        if self._sum is None or self._sum.shape != up.shape:
            if self._sum is not None:
                raise InputError(f"attention maps: a layer of shape {up.shape} after {self._sum.shape}; "
                                 "use one collector per generation")
            self._sum = np.zeros(up.shape, np.float32)
        self._sum += up
        self.layers_added += 1
        self.steps_added.add(self._step)


# ---------------------------------------------------------------------------------------------
# Bicubic upsampling (torch's F.interpolate(mode="bicubic", align_corners=False))
# ---------------------------------------------------------------------------------------------

def bicubic_matrix(n_in, n_out, a=-0.75):
    """[n_out, n_in] matrix of 1-D cubic convolution (Keys 1981, a = -0.75 as torch/OpenCV).

    Output pixel o samples the input at s = (o + 0.5) n_in / n_out - 0.5; with i = floor(s), t = s - i
    it weighs inputs i-1, i, i+1, i+2 (clamped to the border) by W(t+1), W(t), W(1-t), W(2-t):
        W(x) = (a+2)|x|^3 - (a+3)|x|^2 + 1          |x| <= 1
        W(x) = a|x|^3 - 5a|x|^2 + 8a|x| - 4a        1 < |x| < 2
    """
    s = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5                     # [n_out]
    i = np.floor(s).astype(np.int64)
    t = s - i

    def near(x):
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)   # [n_out, 4]
    out = np.zeros((n_out, n_in))
    for j in range(4):
        np.add.at(out, (np.arange(n_out), np.clip(i - 1 + j, 0, n_in - 1)), weights[:, j])
    return out.astype(np.float32)


def upsample_bicubic(x, size):
    """x [..., h_l, w_l] -> [..., h, w] (the identity when the sizes agree)."""
    hl, wl = x.shape[-2:]
    if (hl, wl) == tuple(size):
        return x.astype(np.float32, copy=True)
    rows, cols = bicubic_matrix(hl, size[0]), bicubic_matrix(wl, size[1])  # [h, h_l], [w, w_l]
    return np.matmul(np.matmul(rows, x), cols.T)                             # [..., h, w]


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def _layer_size(n, size):
    """N pixels of a layer -> its (h_l, w_l): the latent size halved (rounded up) k times."""
    h, w = size
    while h * w > n and (h > 1 or w > 1):
        h, w = -(-h // 2), -(-w // 2)
    if h * w != n:
        raise InputError(f"attention maps: a layer of {n} pixels is no level of a {size} latent")
    return h, w


def _as_size(r):
    if isinstance(r, (int, np.integer)):
        return (int(r), None)
    h, w = r
    return (int(h), int(w))


def _token_string(tok, i):
    """A token id -> its BPE string ("red</w>"); an added word's (textual inversion) ids -> the word,
    its last id ending in "</w>"."""
    if i < tok.vocab_size:
        return tok._tok.id_to_token(int(i))
    for word, ids in tok.added_words.items():
        if i in ids:
            return word + ("</w>" if i == ids[-1] else "")
    return "<unknown>"
