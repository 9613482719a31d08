"""Readers (MVTec 3D-AD, MVTec AD, MVTec AD 2, MVTec LOCO, VisA, Eyecandies, folder, described folders),
geometry preprocessing and the synthetic generator."""

from iumad.data.dataset import ClassSource, find_classes, require_records
from iumad.data.loading import load_sample
from iumad.data.sample import Sample, SampleRecord

__all__ = ["ClassSource", "Sample", "SampleRecord", "find_classes", "load_sample", "require_records"]
