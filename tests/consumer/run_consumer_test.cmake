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
message(STATUS "consumer project built and ran against ${prefix}")
