"""Effective conductivity of battery-electrode-like microstructures: two-phase
voxel media (:mod:`.microstructure`), a finite-volume conduction solver
(:mod:`.solver`) and a cached, labelled dataset builder (:mod:`.dataset`)."""

from hal.models.conductivity.cnn import conductivity_cnn
from hal.models.conductivity.dataset import ConductivityDataset, build_dataset
from hal.models.conductivity.microstructure import gaussian_random_field, grid_shape, overlapping_spheres
from hal.models.conductivity.solver import ConductionResult, effective_conductivity, solve_conduction
from hal.models.conductivity.train import TrainResult, run_workload, train_conductivity

__all__ = [
    "ConductionResult", "ConductivityDataset", "build_dataset", "effective_conductivity",
    "gaussian_random_field", "grid_shape", "overlapping_spheres", "solve_conduction",
    "conductivity_cnn", "TrainResult", "run_workload", "train_conductivity",
]
