// CUDA emulation build: see cuda_runtime_api.h.
#pragma once

#include "emulation/cuda_emulation.h"
#include "cuda_runtime_api.h"
