// Everything tensormap offers: the torch-free core (core.h) and the LibTorch layer.
#pragma once

#include "tensormap/core.h"
#include "tensormap/distributed.h"
#include "tensormap/module.h"
#include "tensormap/state_dict.h"
#include "tensormap/tensor.h"
