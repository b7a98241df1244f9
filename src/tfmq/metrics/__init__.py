"""Quality metrics with our own Fashion-MNIST feature network."""

from tfmq.metrics.quality import (
    QualityMetrics,
    load_reference_statistics,
    paired_similarity,
    save_reference_statistics,
)

__all__ = ["QualityMetrics", "load_reference_statistics", "paired_similarity", "save_reference_statistics"]
