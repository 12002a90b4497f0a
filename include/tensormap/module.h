// Binding torch::nn modules to checkpoints: skeletons (skeleton.h), load (load.h) and
// save (save.h), for code that wants all three.
#pragma once

#include "tensormap/load.h"
#include "tensormap/save.h"
#include "tensormap/skeleton.h"
