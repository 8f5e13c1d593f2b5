"""feedrank: production-grade feed ranking (two-tower retrieval, 4-stage funnel, streaming features)."""

__version__ = "0.1.0"
