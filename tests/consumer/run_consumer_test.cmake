# Installs the already-built project into a scratch prefix, then configures, builds and
# runs tests/consumer against that prefix. Fails on the first step that fails.
file(REMOVE_RECURSE "${WORK_DIR}")
set(prefix "${WORK_DIR}/prefix")

function(step)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "step failed (${rc}): ${ARGN}\n${out}\n${err}")
  endif()
endfunction()

step(${CMAKE_COMMAND} --install "${BUILD_DIR}" --prefix "${prefix}")
foreach(f include/tensormap/core.h include/tensormap/file.h)
  if(NOT EXISTS "${prefix}/${f}")
    message(FATAL_ERROR "install did not put ${f} in place")
  endif()
endforeach()
step(${CMAKE_COMMAND} -S "${SOURCE_DIR}/tests/consumer" -B "${WORK_DIR}/build" -G "${GENERATOR}"
     "-DCMAKE_PREFIX_PATH=${prefix}")
step(${CMAKE_COMMAND} --build "${WORK_DIR}/build")
step("${WORK_DIR}/build/consumer" "${WORK_DIR}/out.tmap")
if(EXISTS "${WORK_DIR}/build/consumer_torch")
  step("${WORK_DIR}/build/consumer_torch" "${WORK_DIR}/out_torch.tmap")
endif()
# The Python package, where it was built: installed for the system Python, it imports from
# the prefix alone (its libtensormap_torch too, not the build tree's) and reads what the
# C++ consumer wrote.
if(PYTHON_INSTALL_DIR)
  set(package "${prefix}/${PYTHON_INSTALL_DIR}")
  if(NOT EXISTS "${package}/tensormap/__init__.py")
    message(FATAL_ERROR "install did not put the Python package in ${package}/tensormap")
  endif()
  set(check [=[
import os, sys, torch
prefix, package, cpp_file, out = sys.argv[1:5]
sys.path.insert(0, package)
import tensormap
assert tensormap.__file__.startswith(package), tensormap.__file__
with open("/proc/self/maps") as f:
    libs = {line.split()[-1] for line in f if "libtensormap" in line}
assert libs and all(lib.startswith(prefix) for lib in libs), libs
if os.path.exists(cpp_file):
    with tensormap.open(cpp_file) as f:
        assert len(f) > 0 and all(f[k].numel() >= 0 for k in f)
tensormap.save({"a": torch.arange(6.0)}, out)
assert tensormap.open(out)["a"].sum() == 15
print("installed package:", tensormap.__file__, sorted(libs))
]=])
  step(${PYTHON} -c "${check}" "${prefix}" "${package}" "${WORK_DIR}/out_torch.tmap" "${WORK_DIR}/out_python.tmap")
endif()

# The core needs no LibTorch: the same project, with LibTorch made unfindable, builds and
# runs its core program.
step(${CMAKE_COMMAND} -S "${SOURCE_DIR}/tests/consumer" -B "${WORK_DIR}/build-core-only" -G "${GENERATOR}"
     "-DCMAKE_PREFIX_PATH=${prefix}" -DCMAKE_DISABLE_FIND_PACKAGE_Torch=ON)
step(${CMAKE_COMMAND} --build "${WORK_DIR}/build-core-only")
if(EXISTS "${WORK_DIR}/build-core-only/consumer_torch")
  message(FATAL_ERROR "without LibTorch, the package still offered the LibTorch layer")
endif()
step("${WORK_DIR}/build-core-only/consumer" "${WORK_DIR}/out-core-only.tmap")
message(STATUS "consumer project built and ran against ${prefix}, with and without LibTorch")
