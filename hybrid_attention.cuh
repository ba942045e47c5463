// hybrid_attention.cuh: the LoLCATs hybrid attention (sliding-window softmax + Hedgehog linear
// attention), forward and backward, chunked and linear in T. (to be written)
#pragma once
#include "cuda_common.cuh"
