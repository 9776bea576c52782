"""Image geometry: where every voxel of an array sits in the patient.

Arrays everywhere in napari-cdpdnet are indexed ``[z, y, x]`` (the order SimpleITK's
``GetArrayFromImage`` returns and napari displays). Geometry values follow ITK/DICOM
conventions: ``spacing``, ``origin`` and the columns of ``direction`` are given in ``(x, y, z)``
order, and world coordinates are **LPS** millimetres (DICOM patient coordinates: x grows to
the patient's Left, y to Posterior, z to Superior). RAS (NIfTI/nibabel/MONAI) is obtained by
negating the first two world axes.

This module imports only numpy; SimpleITK is imported inside the functions that need it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import SimpleITK as sitk

__all__ = ["Geometry", "DicomReference", "LPS_TO_RAS", "NAPARI_AXIS_LABELS"]

#: Multiply LPS world coordinates (homogeneous) by this to get RAS, and vice versa.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class DicomReference:
    """What a DICOM-SEG (or any derived DICOM object) must reference about its source series.

    ``sop_instance_uids`` and ``files`` are in slice order along the slice normal. When their
    number equals the array's slice count, entry ``k`` is the slice at array index ``[k, :, :]``;
    a series with uneven gaps is resampled on reading and then has more array slices than
    source files (derived objects must then be positioned by geometry, as DICOM-SEG export is).
    """

    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    sop_class_uid: str
    sop_instance_uids: tuple[str, ...]
    files: tuple[str, ...]
    modality: str = "CT"
    series_description: str = ""
    patient_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        d = asdict(self)
        d["sop_instance_uids"] = list(self.sop_instance_uids)
        d["files"] = list(self.files)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DicomReference:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["sop_instance_uids"] = tuple(d["sop_instance_uids"])
        d["files"] = tuple(d["files"])
        return cls(**d)


#: Names of napari's world axes for layers made from a :class:`Geometry`. The world is LPS in
#: zyx order, so the slider of axis 0 steps through axial slices (S-I), axis 1 through coronal
#: ones (A-P), axis 2 through sagittal ones (L-R); without names napari shows "-3", "-2", "-1".
NAPARI_AXIS_LABELS = ("axial", "coronal", "sagittal")


def _tuple3(values: Sequence[float], name: str) -> tuple[float, float, float]:
    out = tuple(float(v) for v in values)
    if len(out) != 3:
        raise ValueError(f"{name} needs 3 values, got {len(out)}")
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class Geometry:
    """Voxel grid of a 3-D image in patient space.

    Args:
        spacing: voxel size in mm along the array's x, y, z axes (ITK order).
        origin: LPS position (mm) of the centre of voxel ``[0, 0, 0]``.
        direction: 3×3 direction cosines, row-major (ITK ``GetDirection()``); column ``i`` is
            the LPS unit vector of index axis ``i`` (x, y, z).
        shape: array shape ``(z, y, x)``.
        dicom: source-series identifiers when the image came from DICOM.
    """

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    shape: tuple[int, int, int]
    dicom: DicomReference | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "spacing", _tuple3(self.spacing, "spacing"))
        object.__setattr__(self, "origin", _tuple3(self.origin, "origin"))
        direction = tuple(float(v) for v in np.asarray(self.direction, dtype=float).ravel())
        if len(direction) != 9:
            raise ValueError(f"direction needs 9 values (3×3), got {len(direction)}")
        object.__setattr__(self, "direction", direction)
        shape = tuple(int(v) for v in self.shape)
        if len(shape) != 3:
            raise ValueError(f"shape needs 3 values (z, y, x), got {shape}")
        object.__setattr__(self, "shape", shape)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def identity(
        cls, shape: Sequence[int], spacing: Sequence[float] = (1.0, 1.0, 1.0)
    ) -> Geometry:
        """Axis-aligned grid at the origin (for synthetic data and tests)."""
        return cls(tuple(spacing), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()), tuple(shape))

    @classmethod
    def from_sitk(cls, image: sitk.Image, dicom: DicomReference | None = None) -> Geometry:
        """Geometry of a 3-D SimpleITK image."""
        size = image.GetSize()
        if len(size) != 3:
            raise ValueError(f"expected a 3-D image, got {len(size)}-D")
        return cls(
            spacing=image.GetSpacing(),
            origin=image.GetOrigin(),
            direction=image.GetDirection(),
            shape=tuple(reversed(size)),
            dicom=dicom,
        )

    @classmethod
    def from_affine_lps(
        cls, affine: np.ndarray, shape: Sequence[int], dicom: DicomReference | None = None
    ) -> Geometry:
        """Geometry from a 4×4 (x, y, z)-index → LPS affine (may include shear-free scaling)."""
        affine = np.asarray(affine, dtype=float)
        linear = affine[:3, :3]
        spacing = np.linalg.norm(linear, axis=0)
        if np.any(spacing <= 0):
            raise ValueError("affine has a zero-length axis")
        return cls(tuple(spacing), tuple(affine[:3, 3]), tuple((linear / spacing).ravel()),
                   tuple(shape), dicom)

    @classmethod
    def from_affine_ras(
        cls, affine: np.ndarray, shape: Sequence[int], dicom: DicomReference | None = None
    ) -> Geometry:
        """Geometry from a NIfTI/MONAI-style (x, y, z)-index → RAS affine."""
        return cls.from_affine_lps(LPS_TO_RAS @ np.asarray(affine, dtype=float), shape, dicom)

    # ------------------------------------------------------------------ matrices
    @property
    def size_xyz(self) -> tuple[int, int, int]:
        """Image size in ITK order (x, y, z)."""
        return self.shape[2], self.shape[1], self.shape[0]

    @property
    def direction_matrix(self) -> np.ndarray:
        """3×3 direction cosines; column i is the LPS direction of index axis i (x, y, z)."""
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def voxel_volume_mm3(self) -> float:
        """Volume of one voxel in mm³ (1 mL = 1000 mm³)."""
        return float(np.prod(self.spacing))

    def affine_lps(self) -> np.ndarray:
        """4×4 affine mapping homogeneous (x, y, z) voxel indices to LPS mm."""
        a = np.eye(4)
        a[:3, :3] = self.direction_matrix * np.asarray(self.spacing)[None, :]
        a[:3, 3] = self.origin
        return a

    def affine_ras(self) -> np.ndarray:
        """4×4 affine mapping (x, y, z) voxel indices to RAS mm (NIfTI, nibabel, MONAI)."""
        return LPS_TO_RAS @ self.affine_lps()

    def affine_zyx(self) -> np.ndarray:
        """4×4 affine mapping ``[z, y, x]`` array indices to LPS mm written in (z, y, x) order.

        This is the transform napari needs: its data and world axes are both in array order.
        """
        p = np.eye(4)[[2, 1, 0, 3]]
        return p @ self.affine_lps() @ p

    def napari_layer_kwargs(self) -> dict[str, Any]:
        """:meth:`napari_transform` plus the names of the world axes (:data:`NAPARI_AXIS_LABELS`)."""
        return {**self.napari_transform(), "axis_labels": NAPARI_AXIS_LABELS}

    def napari_transform(self) -> dict[str, Any]:
        """``scale``, ``translate`` and ``rotate`` for a napari layer of this grid (zyx order).

        A direction matrix with a reflection (determinant −1) cannot be a rotation; then the
        whole transform is returned as ``affine`` instead, which napari applies the same way.
        """
        p = np.eye(3)[[2, 1, 0]]
        rot = p @ self.direction_matrix @ p
        scale = tuple(reversed(self.spacing))
        translate = tuple(reversed(self.origin))
        if np.linalg.det(rot) > 0:
            return {"scale": scale, "translate": translate, "rotate": rot}
        return {"affine": self.affine_zyx()}

    def index_to_world(self, zyx: np.ndarray) -> np.ndarray:
        """LPS mm (x, y, z) of ``[z, y, x]`` indices; accepts ``(3,)`` or ``(N, 3)``."""
        zyx = np.asarray(zyx, dtype=float)
        xyz = zyx[..., ::-1]
        return xyz @ (self.direction_matrix * np.asarray(self.spacing)).T + np.asarray(self.origin)

    def world_to_index(self, lps: np.ndarray) -> np.ndarray:
        """Continuous ``[z, y, x]`` indices of LPS mm points; accepts ``(3,)`` or ``(N, 3)``."""
        lps = np.asarray(lps, dtype=float)
        lin = self.direction_matrix * np.asarray(self.spacing)
        xyz = (lps - np.asarray(self.origin)) @ np.linalg.inv(lin).T
        return xyz[..., ::-1]

    def same_grid(self, other: Geometry, atol: float = 1e-4) -> bool:
        """True when both geometries describe the same voxel grid (within ``atol`` mm)."""
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.origin, other.origin, atol=atol)
            and np.allclose(self.direction, other.direction, atol=atol)
        )

    # ------------------------------------------------------------------ SimpleITK
    def to_sitk(self, array: np.ndarray) -> sitk.Image:
        """Wrap a ``[z, y, x]`` array in a SimpleITK image carrying this geometry."""
        import SimpleITK as sitk

        array = np.asarray(array)
        if array.shape != self.shape:
            raise ValueError(f"array shape {array.shape} does not match geometry {self.shape}")
        image = sitk.GetImageFromArray(array)
        self.apply_to(image)
        return image

    def apply_to(self, image: sitk.Image) -> None:
        """Set spacing, origin and direction of a SimpleITK image in place."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)

    # ------------------------------------------------------------------ serialisation
    def with_dicom(self, dicom: DicomReference | None) -> Geometry:
        """Copy with other DICOM references."""
        return replace(self, dicom=dicom)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (stored in napari layer metadata and label tables)."""
        return {
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
            "shape": list(self.shape),
            "dicom": None if self.dicom is None else self.dicom.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Geometry:
        """Inverse of :meth:`to_dict`."""
        dicom = d.get("dicom")
        return cls(
            spacing=d["spacing"],
            origin=d["origin"],
            direction=d["direction"],
            shape=d["shape"],
            dicom=None if dicom is None else DicomReference.from_dict(dicom),
        )
