# lolcats.cu build. `make train_lolcats` (GPU binary), `make test` (CPU suite, runs it),
# `make test_gpu` (GPU parity suite, run on a GPU machine), `make all` (every target, no GPU needed),
# `make dev` (kernel lab in dev/).
# Options: GPU_ARCH (default sm_90a for the H200/H100), USE_MPI=1, USE_NCCL=1, PYTHON.

GPU_ARCH ?= sm_90a
GPU_COMPUTE = $(subst sm_,compute_,$(GPU_ARCH))
NVCC ?= nvcc
CXX ?= g++
PYTHON ?= python3
SHARED ?= ../shared

NVCC_FLAGS = -O3 -std=c++17 -gencode arch=$(GPU_COMPUTE),code=$(GPU_ARCH) -lineinfo \
             --expt-relaxed-constexpr -Xcompiler -fopenmp -I. -Xptxas -warn-spills
NVCC_LIBS = -lcublas -lcublasLt -lgomp
ifeq ($(USE_NCCL),1)
  NVCC_FLAGS += -DUSE_NCCL
  NVCC_LIBS += -lnccl
endif
ifeq ($(USE_MPI),1)
  NVCC_FLAGS += -DUSE_MPI $(shell mpicxx --showme:compile 2>/dev/null)
  NVCC_LIBS += $(shell mpicxx --showme:link 2>/dev/null)
endif
CXX_FLAGS = -O2 -march=native -std=c++17 -fopenmp -I. -Wall -Wno-unused-function
GTEST_LIBS = -lgtest -lgtest_main -lpthread

BUILD = build
HEADERS = $(wildcard *.h *.cuh reference/*.h)
CPU_TEST_SRC = $(wildcard test/test_*.cpp)
CPU_TEST_OBJ = $(patsubst test/%.cpp,$(BUILD)/test/%.o,$(CPU_TEST_SRC))
GPU_TEST_SRC = $(wildcard test/gpu_*.cu)
GPU_TEST_OBJ = $(patsubst test/%.cu,$(BUILD)/test/%.o,$(GPU_TEST_SRC))

.PHONY: all test test_gpu dev clean fixtures

all: train_lolcats $(BUILD)/test_cpu $(BUILD)/test_gpu $(BUILD)/ref_perplexity dev

train_lolcats: train_lolcats.cu $(HEADERS)
	$(NVCC) $(NVCC_FLAGS) $< -o $@ $(NVCC_LIBS)

# Model fixtures exported from the committed Hugging Face fixtures by our own exporter, so the CPU
# suite exercises scripts/export.py too. CI needs numpy, never torch.
FIXTURE_DIRS = $(wildcard test/fixtures/hf_*)
FIXTURE_BINS = $(patsubst test/fixtures/%,$(BUILD)/fixtures/%.bin,$(FIXTURE_DIRS))
$(BUILD)/fixtures/%.bin: test/fixtures/% scripts/export.py
	@mkdir -p $(dir $@)
	$(PYTHON) scripts/export.py hf $< $@ --dtype fp32 --quiet
$(BUILD)/fixtures/stories260k.bin: $(SHARED)/models/stories260K.bin scripts/export.py
	@mkdir -p $(dir $@)
	$(PYTHON) scripts/export.py llama2c $< $@ --dtype fp32 --quiet
# Tokenizers exported from the real files that scripts/fetch_assets.sh unpacks into assets/.
$(BUILD)/tokenizer/llama3.tok: assets/llama3_tokenizer.model scripts/export_tokenizer.py scripts/lolcats_tokenizer.py
	@mkdir -p $(dir $@)
	$(PYTHON) scripts/export_tokenizer.py llama3 $< $@ --quiet
$(BUILD)/tokenizer/smollm2.tok: assets/SmolLM2-135M-Instruct.Q4_1.gguf scripts/export_tokenizer.py scripts/gguf_reader.py
	@mkdir -p $(dir $@)
	$(PYTHON) scripts/export_tokenizer.py gguf $< $@ --quiet
TOKENIZERS = $(if $(wildcard assets/llama3_tokenizer.model),$(BUILD)/tokenizer/llama3.tok) \
             $(if $(wildcard assets/SmolLM2-135M-Instruct.Q4_1.gguf),$(BUILD)/tokenizer/smollm2.tok)

fixtures: $(FIXTURE_BINS) $(BUILD)/fixtures/stories260k.bin $(TOKENIZERS)

$(BUILD)/test/%.o: test/%.cpp $(HEADERS)
	@mkdir -p $(dir $@)
	$(CXX) $(CXX_FLAGS) -c $< -o $@
$(BUILD)/test_cpu: $(CPU_TEST_OBJ)
	$(CXX) $(CXX_FLAGS) $^ -o $@ $(GTEST_LIBS)

test: $(BUILD)/test_cpu fixtures train_lolcats
	LOLCATS_SHARED=$(SHARED) LOLCATS_BUILD=$(BUILD) ./$(BUILD)/test_cpu
	LOLCATS_SHARED=$(SHARED) LOLCATS_BUILD=$(BUILD) $(PYTHON) -m pytest -q test/python

# CPU-reference perplexity of a token shard (the oracle beside --eval-ppl and transformers).
$(BUILD)/ref_perplexity: reference/perplexity_main.cpp $(HEADERS)
	@mkdir -p $(dir $@)
	$(CXX) $(CXX_FLAGS) -O3 $< -o $@

$(BUILD)/test/%.o: test/%.cu $(HEADERS)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCC_FLAGS) -c $< -o $@
$(BUILD)/test_gpu: $(GPU_TEST_OBJ)
	$(NVCC) $(NVCC_FLAGS) $^ -o $@ $(NVCC_LIBS) $(GTEST_LIBS)

test_gpu: $(BUILD)/test_gpu fixtures
	LOLCATS_SHARED=$(SHARED) LOLCATS_BUILD=$(BUILD) ./$(BUILD)/test_gpu

dev:
	$(MAKE) -C dev GPU_ARCH=$(GPU_ARCH)

clean:
	rm -rf $(BUILD) train_lolcats
	$(MAKE) -C dev clean
