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
