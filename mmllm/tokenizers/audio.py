"""`SpectrogramCodec`: a small STFT-domain speech codec with residual codes (registry "audio-codec").

    wave at sample_rate (16 kHz) -> resampled to codec_rate (8 kHz)
      -> STFT (n_fft 256, hop 10 ms) -> log(1 + |S| / floor) (129 bins, 100 frames/s)
      -> conv encoder, two stride-2 stages -> 25 frames/s -> latent (4 channels)
      -> residual quantizer (default: residual FSQ, bins [4, 4, 4, 4], depth 2: 2 levels of 256)
      -> conv decoder, two transposed stride-2 stages -> 100 frames/s
      -> log-magnitude and phase advance per bin -> phase = running sum of the advances
      -> inverse STFT at 8 kHz -> resampled to 16 kHz

Rates. Media enter and leave at `sample_rate`, 16 kHz by default: the rate of the toy world and
of `media.read_media`, so a bare array is always at `sample_rate` and `prepare` is idempotent
(the evaluator prepares items that `encode` prepares again). The network runs at `codec_rate`,
8 kHz by default, enough for toy speech (tones in [300, 3500] Hz) and half the work.

Phase. The decoder predicts how far each bin's phase moves from one STFT frame to the next
(the bin's centre frequency plus a bounded deviation, as a phase vocoder does) and the phase is
the running sum of those advances. A steady tone then needs a steady output, which a
convolution gives naturally; predicting absolute phase per frame (Vocos) would need the decoder
to count frames. The codes carry no absolute phase, so the reconstruction matches magnitudes,
not the waveform sample by sample (SI-SNR is low by design; what is kept is what is heard).

Training loss (what is differentiated), on the 8 kHz signals, STFT frames past an item's end
masked out:
  * the multi-resolution STFT loss of Parallel WaveGAN / SoundStream: spectral convergence plus
    L1 log-magnitude over three FFT sizes, between the decoded waveform (through the inverse
    STFT, so phases and magnitudes both get gradients) and the input waveform;
  * L1 log-magnitude between the decoder's own magnitudes and the input's STFT at the codec's
    resolution. It needs no consistent phase, so it teaches the magnitudes from the first step,
    while the waveform loss is still blurred by the untrained phases (without it no word was
    readable after 2000 steps);
  * a penalty on latents past +-2 (`LATENT_BOUND`), and the quantizer's own loss (0 for FSQ).
Two choices keep training from collapsing onto one code: He-initialised convolutions (torch's
default init shrinks input differences to ~1% of the latents' common offset, which the first
updates push into the saturated ends of FSQ's tanh) with the penalty above, and a decoder that
starts out silent, so the first steps shape tones instead of quieting loud noise.

Input conventions (`prepare`):
  * float mono `(samples,)` at `sample_rate`, or a `(wave, rate)` pair (what `media.read_audio`
    returns), resampled to `sample_rate`;
  * a `(samples, channels)` array with at most 8 channels is downmixed by averaging; other
    shapes, non-float dtypes, empty audio, NaN or inf raise `MediaError`;
  * audio longer than `max_frames` frames (2 s for the toy config) raises `MediaError` rather
    than being cut: a cut utterance would lose words without anyone noticing.

An item of n samples has ceil(n / (sample_rate / frame_rate)) frames and is zero-padded to whole
frames, so decoded audio is frames * sample_rate / frame_rate samples long. Encoding and
decoding run item by item, so an item's codes never depend on what it is batched with.
Coarse-only codes (frames, k < levels), as `first_k` flattening streams them, decode with the
missing levels set to the quantizer's zero-residual code (flagged, like any repair).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmllm.data.media import resample_audio
from mmllm.errors import ConfigError, MediaError
from mmllm.tokenizers.base import EncodedBatch, ModalityTokenizer, register_tokenizer
from mmllm.tokenizers.quantizers import build_quantizer

DOWNSAMPLING = 4  # two stride-2 stages between the STFT frame rate and the code frame rate
MAX_CHANNELS = 8  # a (samples, channels) array with more "channels" is likely transposed (7.1 surround has 8)
LOG_FLOOR = 1e-3  # magnitude floor of the log spectra: ~90 dB under a full-scale tone's peak bin (~64 at n_fft 256)
INPUT_SCALE = 10.0  # log(1 + 64 / LOG_FLOOR) ~ 11 for a full-scale tone: encoder inputs stay within about [0, 1]
MAX_LOG_MAGNITUDE = math.log(1e3)  # clamp of the predicted log-magnitude, above any full-scale bin: exp never overflows
LATENT_BOUND = 2.0  # |latent| beyond which training pulls it back: tanh(2) = 0.96, FSQ's outermost cells start below
# (n_fft, hop) of the multi-resolution STFT loss at 8 kHz: 16 to 64 ms windows, hop a quarter of the window
LOSS_RESOLUTIONS = ((128, 32), (256, 64), (512, 128))


class AudioBatch(NamedTuple):
    """A training batch at codec_rate: waves (batch, samples) zero-padded to whole frames, true lengths."""

    waves: torch.Tensor
    lengths: torch.Tensor


class ResidualBlock(nn.Module):
    """x + pointwise(gelu(conv_k(gelu(x)))): a block that sees `kernel` frames."""

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel, padding=kernel // 2)
        self.pointwise = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pointwise(F.gelu(self.conv(F.gelu(x))))


# Both networks see little context on purpose: a code frame then stands for its own 40 ms
# whatever surrounds it, so the decoder learns one spectrum per code rather than one per code
# in each context, and sounds that are rare in the training data are still learned. (With
# dilated blocks at 25 frames/s the codes came to depend on the neighbouring tones, and rare
# tone pairs were decoded as silence.)


def _encoder(bins: int, channels: list[int], latent_dim: int) -> nn.Sequential:
    """Sees about 100 ms around each code frame (its four STFT frames and their neighbours)."""
    narrow, middle, wide = channels
    return nn.Sequential(
        nn.Conv1d(bins, narrow, 3, padding=1),
        nn.GELU(),
        nn.Conv1d(narrow, middle, 4, stride=2, padding=1),  # exactly halves an even length
        nn.GELU(),
        nn.Conv1d(middle, wide, 4, stride=2, padding=1),
        ResidualBlock(wide, 1),
        ResidualBlock(wide, 1),
        nn.GELU(),
        nn.Conv1d(wide, latent_dim, 1),
    )


def _decoder(bins: int, channels: list[int], latent_dim: int) -> nn.Sequential:
    """Sees the code frame and one neighbour each side: enough to shape the transitions."""
    narrow, middle, wide = channels
    return nn.Sequential(
        nn.Conv1d(latent_dim, wide, 1),
        ResidualBlock(wide, 3),
        ResidualBlock(wide, 1),
        nn.GELU(),
        nn.ConvTranspose1d(wide, middle, 4, stride=2, padding=1),  # exactly doubles the length
        nn.GELU(),
        nn.ConvTranspose1d(middle, narrow, 4, stride=2, padding=1),
        ResidualBlock(narrow, 3),
        nn.GELU(),
        nn.Conv1d(narrow, 2 * bins, 1),  # log-magnitude and phase-advance deviation per bin
    )


def _init_conv(module: nn.Module) -> None:
    """He-normal weights and zero biases: input differences reach the latent undamped.

    With torch's default init every GELU layer shrinks the signal by about half, so at init the
    latents of all frames differ by ~1% of their common offset; the first updates then push that
    offset into the saturated ends of FSQ's tanh, and every frame gets the same code for good.
    """
    if isinstance(module, nn.Conv1d | nn.ConvTranspose1d):
        nn.init.kaiming_normal_(module.weight, nonlinearity="relu")  # relu's gain sqrt(2) is close to GELU's
        nn.init.zeros_(module.bias)


@register_tokenizer
class SpectrogramCodec(ModalityTokenizer):
    """STFT-domain speech codec: 25 frames/s, residual codes, phase from predicted phase advances."""

    name = "audio-codec"
    modality = "audio"
    trainable = True

    def __init__(
        self,
        sample_rate: int = 16000,  # media in and out: the toy world's and media.read_media's rate
        codec_rate: int = 8000,  # the network's rate: toy tones lie in [300, 3500] Hz, under its 4 kHz Nyquist
        frame_rate: int = 25,  # code frames per second: 2 s of speech in 50 frames
        n_fft: int = 256,  # 32 ms window at 8 kHz: 31 Hz bins, fine next to the toy tones' x1.25 spacing
        channels: tuple[int, ...] | list[int] = (32, 64, 128),  # widths at 100, 50 and 25 frames/s
        latent_dim: int = 4,  # one channel per FSQ bin
        quantizer: dict[str, Any] | None = None,
        max_frames: int = 50,  # 2 s at 25 frames/s: 100 tokens with 2 levels
        train_frames: int | None = None,  # training crops (frames) to cut the cost of a step; None: whole items
    ) -> None:
        super().__init__()
        hop = codec_rate / (frame_rate * DOWNSAMPLING)
        if hop != int(hop) or not 0 < hop <= n_fft or sample_rate % frame_rate:
            raise ConfigError(
                f"audio-codec: need codec_rate {codec_rate} / (frame_rate {frame_rate} x {DOWNSAMPLING}) a whole "
                f"STFT hop of at most n_fft ({n_fft}) samples, and sample_rate {sample_rate} whole frames"
            )
        if len(channels) != 3:
            raise ConfigError(f"audio-codec: channels needs 3 widths (100, 50, 25 frames/s), got {list(channels)}")
        self.sample_rate = sample_rate
        self.codec_rate = codec_rate
        self.frame_rate = frame_rate
        self.n_fft = n_fft
        self.channels = [int(c) for c in channels]
        self.latent_dim = latent_dim
        self.quantizer_spec = dict(quantizer or {"kind": "rfsq", "bins": [4, 4, 4, 4], "depth": 2})
        self.max_frames = max_frames
        self.train_frames = train_frames
        self.grid = None
        self.stft_hop = int(hop)
        self.codec_frame = self.stft_hop * DOWNSAMPLING  # samples per code frame at codec_rate
        self.samples_per_frame = sample_rate // frame_rate  # ... and at sample_rate
        bins = n_fft // 2 + 1
        self.encoder = _encoder(bins, self.channels, latent_dim)
        self.quantizer = build_quantizer(latent_dim, self.quantizer_spec)
        self.decoder = _decoder(bins, self.channels, latent_dim)
        self.codebook_size = self.quantizer.codebook_size
        self.levels = self.quantizer.levels
        self.apply(_init_conv)
        head = self.decoder[-1]
        with torch.no_grad():  # start from silence: the first steps then shape tones instead of quieting noise
            head.weight[:bins].mul_(0.1)  # 0.1: small input-dependent part, so the start is near silence everywhere
            head.bias[:bins].fill_(math.log(LOG_FLOOR))
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        # Phase advance of each bin's centre frequency over one hop.
        advance = 2 * math.pi * torch.arange(bins) * self.stft_hop / n_fft
        self.register_buffer("bin_advance", advance, persistent=False)

    def get_config(self) -> dict[str, Any]:
        return {
            "sample_rate": self.sample_rate,
            "codec_rate": self.codec_rate,
            "frame_rate": self.frame_rate,
            "n_fft": self.n_fft,
            "channels": list(self.channels),
            "latent_dim": self.latent_dim,
            "quantizer": dict(self.quantizer_spec),
            "max_frames": self.max_frames,
            "train_frames": self.train_frames,
        }

    # ------------------------------------------------------------ media conventions

    def prepare(self, item: Any, where: str = "input") -> np.ndarray:
        """Float32 mono `(samples,)` at `sample_rate`, at most `max_frames` frames long."""
        rate = self.sample_rate
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], int | np.integer):
            item, rate = item
        array = np.asarray(item)
        if array.dtype.kind != "f":
            raise MediaError(f"{where}: audio samples have dtype {array.dtype}, expected float in [-1, 1]")
        if array.ndim == 2 and 1 <= array.shape[1] <= MAX_CHANNELS:
            array = array.mean(axis=1)
        if array.ndim != 1:
            raise MediaError(
                f"{where}: audio has shape {array.shape}, expected (samples,) or (samples, channels<={MAX_CHANNELS})"
            )
        if array.size == 0:
            raise MediaError(f"{where}: audio has no samples")
        if not np.isfinite(array).all():
            raise MediaError(f"{where}: audio contains NaN or infinite samples")
        if rate <= 0:
            raise MediaError(f"{where}: sample rate {rate} Hz is not positive")
        array = resample_audio(array, int(rate), self.sample_rate)
        limit = self.max_frames * self.samples_per_frame
        if array.size > limit:
            raise MediaError(
                f"{where}: audio lasts {array.size / self.sample_rate:.2f} s, longer than the codec's "
                f"{limit / self.sample_rate:.2f} s ({self.max_frames} frames); split it"
            )
        return array

    def num_frames(self, num_samples: int) -> int:
        """Code frames of an item of `num_samples` samples at sample_rate."""
        return max(1, -(-num_samples // self.samples_per_frame))

    def blank(self) -> np.ndarray:
        """One frame of silence."""
        return np.zeros(self.samples_per_frame, dtype=np.float32)

    def _to_codec_rate(self, item: np.ndarray, frames: int) -> torch.Tensor:
        """(frames * codec_frame,) the item at codec_rate, zero-padded to whole frames."""
        wave = torch.zeros(frames * self.codec_frame)
        resampled = resample_audio(item, self.sample_rate, self.codec_rate)[: wave.numel()]
        wave[: resampled.size] = torch.from_numpy(resampled)
        return wave

    # ------------------------------------------------------------ network

    def _latents(self, waves: torch.Tensor) -> torch.Tensor:
        """(batch, frames, latent_dim) encoder outputs of codec-rate waves of whole frames."""
        return self.encoder(self._compressed_magnitude(waves)).transpose(1, 2)

    def _compressed_magnitude(self, waves: torch.Tensor) -> torch.Tensor:
        """(batch, bins, DOWNSAMPLING * frames) log(1 + |STFT| / LOG_FLOOR) / INPUT_SCALE: 0 for silence, ~1 at most."""
        spec = torch.stft(waves, self.n_fft, self.stft_hop, window=self.window, center=True, return_complex=True)
        return torch.log1p(spec[..., :-1].abs() / LOG_FLOOR) / INPUT_SCALE  # centred framing adds a frame at the end

    def _spectrum(self, quantized: torch.Tensor) -> torch.Tensor:
        """Complex STFT (batch, bins, DOWNSAMPLING * frames) decoded from latents (batch, frames, latent_dim)."""
        log_magnitude, deviation = self.decoder(quantized.transpose(1, 2)).chunk(2, dim=1)
        magnitude = torch.exp(log_magnitude.clamp(max=MAX_LOG_MAGNITUDE))
        advance = self.bin_advance[:, None] + math.pi * torch.tanh(deviation)  # within half a turn of the centre
        return torch.polar(magnitude, torch.cumsum(advance, dim=-1))

    def _waves(self, spectrum: torch.Tensor) -> torch.Tensor:
        """Codec-rate waves (batch, frames * codec_frame) of a decoded spectrum."""
        length = spectrum.shape[-1] * self.stft_hop
        return torch.istft(spectrum, self.n_fft, self.stft_hop, window=self.window, center=True, length=length)

    # ------------------------------------------------------------ encode / decode

    def _encode(self, items: list[np.ndarray]) -> EncodedBatch:
        frames = [self.num_frames(item.size) for item in items]
        codes = torch.zeros(len(items), max(frames), self.levels, dtype=torch.long)
        for i, (item, n) in enumerate(zip(items, frames, strict=True)):
            codes[i, :n] = self.quantizer.encode(self._latents(self._to_codec_rate(item, n)[None]))[0]
        return EncodedBatch(codes, torch.tensor(frames, dtype=torch.long))

    def _decode(self, codes: list[np.ndarray]) -> list[np.ndarray]:
        waves = []
        for item in codes:
            wave = self._waves(self._spectrum(self.quantizer.decode(torch.from_numpy(item)[None])))[0].numpy()
            wave = resample_audio(wave, self.codec_rate, self.sample_rate)
            waves.append(np.ascontiguousarray(wave[: len(item) * self.samples_per_frame], dtype=np.float32))
        return waves

    def zero_residual_codes(self) -> np.ndarray:
        """(levels,) each level's code nearest a zero residual: what missing levels are set to."""
        with torch.no_grad():
            return self.quantizer.encode(torch.zeros(1, self.latent_dim))[0].numpy().astype(np.int64)

    def repair(self, item: Any) -> tuple[np.ndarray, str]:
        """As the base class, but coarse-only codes (frames, k < levels) get zero-residual finer levels."""
        try:
            array = np.asarray(item.cpu() if hasattr(item, "cpu") else item)
        except (TypeError, ValueError):
            return super().repair(item)
        if array.ndim != 2 or not 0 < array.shape[1] < self.levels or array.dtype.kind not in "iu":
            return super().repair(item)
        given = array.shape[1]
        filled = np.repeat(self.zero_residual_codes()[None], array.shape[0], axis=0)
        filled[:, :given] = array
        repaired, note = super().repair(filled)
        filled_note = f"{given} of {self.levels} levels given; the rest set to the zero-residual code"
        return repaired, "; ".join(n for n in (filled_note, note) if n)

    # ------------------------------------------------------------ training

    def collate(self, items: list[np.ndarray]) -> AudioBatch:
        """Prepared items at codec_rate, zero-padded to the batch's longest (in whole frames), and their lengths.

        With `train_frames`, longer items are cut to a random window of that many whole frames.
        """
        if self.train_frames:
            items = [self._crop(item) for item in items]
        frames = max(self.num_frames(item.size) for item in items)
        waves = torch.stack([self._to_codec_rate(item, frames) for item in items])
        lengths = [min(-(-item.size * self.codec_rate // self.sample_rate), waves.shape[1]) for item in items]
        return AudioBatch(waves, torch.tensor(lengths, dtype=torch.long))

    def _crop(self, item: np.ndarray) -> np.ndarray:
        spare = self.num_frames(item.size) - self.train_frames
        if spare <= 0:
            return item
        start = int(torch.randint(spare + 1, ())) * self.samples_per_frame  # torch's generator: the trainer seeds it
        return item[start : start + self.train_frames * self.samples_per_frame]

    def training_loss(self, batch: AudioBatch) -> tuple[torch.Tensor, dict[str, float]]:
        waves, lengths = batch
        sample_mask = (torch.arange(waves.shape[1])[None] < lengths[:, None]).to(waves.dtype)
        target = self._compressed_magnitude(waves)
        latents = self.encoder(target).transpose(1, 2)
        out = self.quantizer(latents)
        # Keeps latents where FSQ's tanh still has slope: once past it the encoder gets no gradient
        # and every frame falls into the same corner code.
        saturation = F.relu(latents.abs() - LATENT_BOUND).pow(2).mean()
        spectrum = self._spectrum(out.quantized)
        frame_mask = (torch.arange(target.shape[-1])[None] * self.stft_hop < lengths[:, None]).to(waves.dtype)
        decoded = torch.log1p(spectrum.abs() / LOG_FLOOR) / INPUT_SCALE
        magnitude_error = (INPUT_SCALE * (decoded - target)).abs() * frame_mask[:, None]
        magnitude = magnitude_error.sum() / (frame_mask.sum() * target.shape[1])
        convergence, log_magnitude = multi_resolution_stft_loss(
            self._waves(spectrum) * sample_mask, waves * sample_mask, lengths
        )
        loss = convergence + log_magnitude + magnitude + out.loss + saturation
        frames = -(-lengths // self.codec_frame)
        valid = torch.arange(out.codes.shape[1])[None] < frames[:, None]
        usage = self.quantizer.usage(out.codes[valid])
        return loss, {
            "spectral_convergence": float(convergence.detach()),
            "log_magnitude": float(log_magnitude.detach()),
            "decoder_magnitude": float(magnitude.detach()),
            "quantizer_loss": float(out.loss.detach()),
            "saturation": float(saturation.detach()),
            "usage": usage["usage"],
            "perplexity": usage["perplexity"],
        }


def multi_resolution_stft_loss(
    decoded: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spectral convergence and L1 log-magnitude, averaged over LOSS_RESOLUTIONS and items.

    STFT frames whose centre lies past an item's length are masked out, so padding adds nothing.
    """
    convergence = log_magnitude = decoded.new_zeros(())
    for n_fft, hop in LOSS_RESOLUTIONS:
        window = torch.hann_window(n_fft, device=decoded.device)
        spec_decoded = torch.stft(decoded, n_fft, hop, window=window, center=True, return_complex=True).abs()
        spec_target = torch.stft(target, n_fft, hop, window=window, center=True, return_complex=True).abs()
        centres = torch.arange(spec_target.shape[-1], device=lengths.device) * hop
        mask = (centres[None] < lengths[:, None]).to(decoded.dtype)[:, None]  # (batch, 1, frames)
        difference = ((spec_target - spec_decoded) * mask).pow(2).sum(dim=(1, 2))
        energy = (spec_target * mask).pow(2).sum(dim=(1, 2)).clamp(min=1e-8)  # 1e-8: guards an all-silent item
        convergence = convergence + (difference / energy).sqrt().mean()
        log_error = (torch.log(spec_target + LOG_FLOOR) - torch.log(spec_decoded + LOG_FLOOR)).abs() * mask
        log_magnitude = log_magnitude + log_error.sum() / (mask.sum() * spec_target.shape[1])
    return convergence / len(LOSS_RESOLUTIONS), log_magnitude / len(LOSS_RESOLUTIONS)
