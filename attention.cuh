// attention.cuh: attention on the GPU. This file holds the teacher's causal softmax attention
// (flash-style, GQA, never materialising T x T); the LoLCATs hybrid attention lives in
// hybrid_attention.cuh, included at the end, so the two can be read (and developed) apart.
#pragma once
#include "cuda_common.cuh"

// ---- teacher: causal softmax attention --------------------------------------------------------
// (to be written)

#include "hybrid_attention.cuh"
