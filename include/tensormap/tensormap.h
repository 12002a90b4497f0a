// Everything tensormap offers: the torch-free core and the LibTorch layer.
#pragma once

#include "tensormap/convert.h"
#include "tensormap/core.h"
#include "tensormap/module.h"
#include "tensormap/process_memory.h"
#include "tensormap/tensor.h"
#include "tensormap/torch_save.h"
