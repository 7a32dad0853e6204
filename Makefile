# Convenience targets; the scripts in scripts/ are the source of truth.
PY ?= python3
CC ?= gcc
CFLAGS_CORE = -std=c11 -Wall -Wextra -Werror -Wno-missing-field-initializers -UNDEBUG -g -O1 -Icsrc $(shell pkg-config --cflags jansson 2>/dev/null)
LIBS_CORE = $(shell pkg-config --libs jansson 2>/dev/null || echo -ljansson) -lz -lm -lpthread
CORE_SRC = $(wildcard csrc/core/*.c)
CTESTS = $(patsubst tests/c/%.c,tests/c/bin/%,$(wildcard tests/c/test_*.c))
CTESTS_ASAN = $(patsubst tests/c/%.c,tests/c/bin/asan_%,$(wildcard tests/c/test_*.c))

.PHONY: setup build test asan ctest ctest-asan bench demo clean fuzz fuzz-replay-st fuzz-replay-json fuzz-st-libfuzzer

setup:
	bash scripts/setup.sh
build:
	MLUTILS_WERROR=1 $(PY) setup.py -q build_ext --inplace
test:
	bash scripts/test.sh
asan:
	bash scripts/asan.sh
demo:
	bash scripts/demo.sh
bench: build
	for f in bench/bench_*.py; do $(PY) $$f || exit 1; done

tests/c/bin/%: tests/c/%.c $(CORE_SRC) $(wildcard csrc/*.h csrc/core/*.h)
	@mkdir -p tests/c/bin
	$(CC) $(CFLAGS_CORE) -o $@ $< $(CORE_SRC) $(LIBS_CORE)
tests/c/bin/asan_%: tests/c/%.c $(CORE_SRC) $(wildcard csrc/*.h csrc/core/*.h)
	@mkdir -p tests/c/bin
	$(CC) $(CFLAGS_CORE) -fsanitize=address,undefined -fno-sanitize-recover=all -o $@ $< $(CORE_SRC) $(LIBS_CORE)

# The NCCL loader's test: pure C + dlfcn, against fake libraries built here.
FAKE_NCCL = tests/c/bin/fake_nccl_ok.so tests/c/bin/fake_nccl_old.so tests/c/bin/fake_nccl_nosym.so \
  tests/c/bin/fake_nccl_nolast.so tests/c/bin/wheel/libnccl.so.2 tests/c/bin/wheel_fp8/libnccl.so.2
FAKE_NCCL_CC = $(CC) -shared -fPIC -O1 -Wall -Wextra -Werror -o $@ tests/c/fake_nccl.c
tests/c/bin/fake_nccl_ok.so tests/c/bin/wheel/libnccl.so.2: tests/c/fake_nccl.c
	@mkdir -p $(dir $@)
	$(FAKE_NCCL_CC)
tests/c/bin/fake_nccl_old.so: tests/c/fake_nccl.c
	@mkdir -p tests/c/bin
	$(FAKE_NCCL_CC) -DFAKE_VERSION=21703
tests/c/bin/fake_nccl_nosym.so: tests/c/fake_nccl.c
	@mkdir -p tests/c/bin
	$(FAKE_NCCL_CC) -DFAKE_OMIT_ALLREDUCE
tests/c/bin/fake_nccl_nolast.so: tests/c/fake_nccl.c
	@mkdir -p tests/c/bin
	$(FAKE_NCCL_CC) -DFAKE_NO_LASTERROR
tests/c/bin/wheel_fp8/libnccl.so.2: tests/c/fake_nccl.c
	@mkdir -p $(dir $@)
	$(FAKE_NCCL_CC) -DFAKE_VERSION=22403
NCCL_LOADER = csrc/cuda/nccl_loader.c csrc/core/error.c
tests/c/bin/test_nccl_loader: tests/c/test_nccl_loader.c $(NCCL_LOADER) csrc/cuda/nccl_loader.h csrc/mlu.h $(FAKE_NCCL)
	@mkdir -p tests/c/bin
	$(CC) $(CFLAGS_CORE) -DFAKE_DIR='"$(CURDIR)/tests/c/bin"' -o $@ $< $(NCCL_LOADER) -ldl
tests/c/bin/asan_test_nccl_loader: tests/c/test_nccl_loader.c $(NCCL_LOADER) csrc/cuda/nccl_loader.h csrc/mlu.h $(FAKE_NCCL)
	@mkdir -p tests/c/bin
	$(CC) $(CFLAGS_CORE) -fsanitize=address,undefined -fno-sanitize-recover=all -DFAKE_DIR='"$(CURDIR)/tests/c/bin"' -o $@ $< $(NCCL_LOADER) -ldl

ctest: $(CTESTS)
	@for t in $(CTESTS); do $$t || exit 1; done
ctest-asan: $(CTESTS_ASAN)
	@for t in $(CTESTS_ASAN); do ASAN_OPTIONS=detect_leaks=1 $$t || exit 1; done

# Fuzz harness of the safetensors header parser: replay its seeds under ASan/UBSan.
tests/fuzz/bin/st_header: tests/fuzz/st_header.c $(wildcard tests/fuzz/*.h) $(CORE_SRC) $(wildcard csrc/*.h csrc/core/*.h)
	@mkdir -p tests/fuzz/bin
	$(CC) $(CFLAGS_CORE) -fsanitize=address,undefined -fno-sanitize-recover=all -o $@ $< $(CORE_SRC) $(LIBS_CORE)
fuzz-replay-st: tests/fuzz/bin/st_header
	ASAN_OPTIONS=detect_leaks=1 tests/fuzz/bin/st_header tests/fuzz/corpus_st_header
# The other harnesses (json_parse, sampler_pack, pattern_layout, dtoa, pt_*): replay
# their seeds plus PT_MUTATE deterministic mutations under ASan/UBSan, e.g.
# make fuzz-replay-json_parse.
tests/fuzz/bin/%: tests/fuzz/%.c $(wildcard tests/fuzz/*.h) $(CORE_SRC) $(wildcard csrc/*.h csrc/core/*.h)
	@mkdir -p tests/fuzz/bin
	$(CC) $(CFLAGS_CORE) -fsanitize=address,undefined -fno-sanitize-recover=all -o $@ $< $(CORE_SRC) $(LIBS_CORE)
fuzz-replay-%: tests/fuzz/bin/%
	ASAN_OPTIONS=detect_leaks=1 PT_MUTATE=$${PT_MUTATE:-300} tests/fuzz/bin/$* tests/fuzz/corpus_$*
fuzz-replay-json: fuzz-replay-json_parse

# Coverage-guided libFuzzer run of every harness (clang installed when missing);
# FUZZ_SECONDS per harness, default 30.
fuzz:
	bash scripts/fuzz.sh

fuzz-st-libfuzzer:
	@mkdir -p tests/fuzz/bin
	clang -g -O1 -fsanitize=fuzzer,address,undefined -DMLU_LIBFUZZER -Icsrc $(shell pkg-config --cflags jansson 2>/dev/null) \
	  -o tests/fuzz/bin/st_header_libfuzzer tests/fuzz/st_header.c $(CORE_SRC) $(LIBS_CORE)
	@mkdir -p tests/fuzz/bin/new_st_header
	tests/fuzz/bin/st_header_libfuzzer -max_total_time=60 tests/fuzz/bin/new_st_header tests/fuzz/corpus_st_header

clean:
	rm -rf build tests/c/bin tests/fuzz/bin mlutils/*.so
