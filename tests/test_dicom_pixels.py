"""The pixel path: decode → model input → compose at native resolution → native stored values."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, SecondaryCaptureImageStorage

from fedeid.dicom.pixels import LOSSY_SYNTAXES, deidentify_pixels, refusal, stored_range


class FakeModel:
    """Test double with DeIdentifier's interface: blocks the left half, synthesises mid-grey."""

    def __init__(self, size: int = 16, fill: float = 0.5, modalities: tuple[str, ...] = ("CR", "DX", "CT", "MR", "NM")):
        self.image_size = size
        self.level_range = (0.0, 1.0)
        self.modalities = modalities
        self.fill = fill
        self.calls: list[np.ndarray] = []

    def deidentify(self, images: np.ndarray, level: float, batch_size: int = 16, compensate: bool = True,
                   seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        assert images.dtype == np.float32 and images.shape[1:] == (self.image_size, self.image_size)
        assert images.min() >= 0.0 and images.max() <= 1.0
        self.calls.append(images.copy())
        mask = np.zeros(images.shape, dtype=bool)
        if level > 0:
            mask[:, :, : self.image_size // 2] = True
        return np.where(mask, np.float32(self.fill), images).astype(np.float32), mask

    def compose_native(self, native: np.ndarray, small: np.ndarray, out: np.ndarray, mask: np.ndarray,
                       level: float) -> tuple[np.ndarray, np.ndarray]:
        """Blocked pixels from the upsampled synthesis, the rest native (pixel-path bookkeeping)."""
        from fedeid.imaging import upsample_result

        y_up, m_up = upsample_result(out, mask, native.shape)
        return np.where(m_up, y_up, native), m_up


def _image(arr: np.ndarray, photometric: str = "MONOCHROME2", signed: bool = False, bits: int = 12,
           modality: str = "CR", **attrs) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.Modality = modality
    ds.PhotometricInterpretation = photometric
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.set_pixel_data(arr, photometric_interpretation=photometric, bits_stored=bits, generate_instance_uid=False)
    if signed:
        assert ds.PixelRepresentation == 1
    return ds


def _ramp(rows: int = 40, cols: int = 30, lo: int = 100, hi: int = 4000, dtype=np.uint16) -> np.ndarray:
    return np.linspace(lo, hi, rows * cols).reshape(rows, cols).astype(dtype)


def test_level_zero_leaves_stored_values_exactly() -> None:
    arr = _ramp()
    ds = _image(arr)
    result = deidentify_pixels(ds, FakeModel(), level=0.0)
    assert result.blocked_fraction == 0.0
    np.testing.assert_array_equal(ds.pixel_array, arr)
    assert ds.pixel_array.dtype == arr.dtype and ds.BitsStored == 12


def test_blocked_half_is_synthesised_and_the_rest_untouched() -> None:
    arr = _ramp()
    ds = _image(arr)
    result = deidentify_pixels(ds, FakeModel(fill=0.5), level=0.5)
    out = ds.pixel_array
    np.testing.assert_array_equal(out[:, 15:], arr[:, 15:])
    lo, hi = np.percentile(arr.astype(float), [0.5, 99.5])
    expected = np.rint(lo + 0.5 * (hi - lo))
    # columns 0-13 lie wholly under the upsampled mask; column 14 borders visible pixels, where
    # the bilinear upsampling of the synthesis blends in its neighbours
    assert np.all(np.abs(out[:, :14].astype(float) - expected) <= 1)
    assert result.blocked_fraction == pytest.approx(0.5)


def test_monochrome1_is_inverted_for_the_model_and_back() -> None:
    arr = _ramp()
    ds = _image(arr, photometric="MONOCHROME1")
    model = FakeModel(fill=0.9)  # "bright" for the model = dense = low stored values in MONOCHROME1
    deidentify_pixels(ds, model, level=0.5)
    seen = model.calls[0][0]
    assert seen[0, 0] > seen[-1, -1]  # the ramp rises in stored values, so it falls after inversion
    lo, hi = np.percentile(arr.astype(float), [0.5, 99.5])
    assert abs(float(ds.pixel_array[0, 0]) - (lo + 0.1 * (hi - lo))) <= 1
    assert ds.PhotometricInterpretation == "MONOCHROME1"


def test_signed_rescaled_values_return_in_native_range_and_dtype() -> None:
    arr = _ramp(lo=-1000, hi=2000, dtype=np.int16)
    ds = _image(arr, signed=True, bits=12, modality="CT", RescaleSlope=2, RescaleIntercept=-1024)
    ds.PixelRepresentation = 1
    deidentify_pixels(ds, FakeModel(fill=1.0), level=0.5)
    out = ds.pixel_array
    assert out.dtype == np.int16 and ds.PixelRepresentation == 1
    lo_v, hi_v = stored_range(ds)
    assert lo_v == -2048 and hi_v == 2047
    assert out.min() >= lo_v and out.max() <= hi_v
    # 1.0 maps to the high percentile of the modality values; inverse rescale gives stored values
    hu_hi = np.percentile(arr.astype(float) * 2 - 1024, 99.5)
    assert abs(float(out[0, 0]) - (hu_hi + 1024) / 2) <= 1


def test_modality_lut_sequence_is_inverted_by_lookup() -> None:
    arr = _ramp(lo=0, hi=255, dtype=np.uint8)
    ds = _image(arr, bits=8)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 16]
    item.LUTData = [int(v) for v in (np.arange(256) ** 2 // 16)]  # non-linear
    item.ModalityLUTType = "US"
    ds.ModalityLUTSequence = [item]
    deidentify_pixels(ds, FakeModel(fill=0.5), level=0.5)
    lut = np.arange(256) ** 2 // 16
    values = lut[arr.astype(int)].astype(float)
    lo, hi = np.percentile(values, [0.5, 99.5])
    target = lo + 0.5 * (hi - lo)
    got = lut[int(ds.pixel_array[0, 0])]
    assert abs(got - target) <= (lut[-1] - lut[-2])


def test_every_frame_of_a_multiframe_image_goes_through_the_model() -> None:
    frames = np.stack([_ramp() + i * 10 for i in range(3)])
    ds = _image(frames, modality="MR")
    model = FakeModel()
    result = deidentify_pixels(ds, model, level=0.5)
    assert result.frames == 3 and model.calls[0].shape == (3, 16, 16)
    out = ds.pixel_array
    assert out.shape == frames.shape
    np.testing.assert_array_equal(out[:, :, 15:], frames[:, :, 15:])


def test_refusals_name_the_reason() -> None:
    model = FakeModel(modalities=("CR",))
    assert "modality MR" in refusal(_image(_ramp(), modality="MR"), model)
    rgb = _image(np.zeros((8, 8, 3), np.uint8), photometric="RGB", bits=8)
    assert "colour image (RGB" in refusal(rgb, FakeModel(modalities=("CR",)))
    assert refusal(_image(_ramp()), model) is None


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",  # uncompressed little endian, signed
        "MR_small_bigendian.dcm",  # big endian
        "MR_small_RLE.dcm",  # RLE
        "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS
        "MR_small_jp2klossless.dcm",  # JPEG 2000
        "JPEG-LL.dcm",  # JPEG lossless
        "JPGExtended.dcm",  # JPEG extended (lossy)
    ],
)
def test_each_transfer_syntax_decodes_and_writes_back_uncompressed(name: str) -> None:
    ds = dcmread(get_testdata_file(name))
    source = str(ds.file_meta.TransferSyntaxUID)
    before = ds.pixel_array.copy()
    deidentify_pixels(ds, FakeModel(), level=0.0)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    np.testing.assert_array_equal(ds.pixel_array, before)
    if source in LOSSY_SYNTAXES:
        assert ds.LossyImageCompression == "01" and ds.LossyImageCompressionMethod == LOSSY_SYNTAXES[source]
    assert JPEGBaseline8Bit in LOSSY_SYNTAXES


def test_real_deidentifier_runs_on_a_native_image() -> None:
    from fedeid.config import preset
    from fedeid.deid.pipeline import DeIdentifier

    model = DeIdentifier.build(preset("test"), device="cpu")
    model.modalities = ("MR",)
    ds = dcmread(get_testdata_file("MR_small.dcm"))
    before = ds.pixel_array.copy()
    result = deidentify_pixels(ds, model, level=0.6)
    out = ds.pixel_array
    assert out.shape == before.shape and out.dtype == before.dtype
    assert 0.3 < result.blocked_fraction < 0.9
    assert (out != before).mean() > 0.9  # visible pixels are re-rendered too, none copied
