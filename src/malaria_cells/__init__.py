"""malaria-cells: honest, patient-disjoint malaria cell classifiers, from training to a model you can ship.

Research and education use only; not a medical device and not for diagnosis.
"""

__version__ = "0.1.0"
