# Convenience targets; the scripts in scripts/ are the source of truth.
PY ?= python3
CC ?= gcc
CFLAGS_CORE = -std=c11 -Wall -Wextra -Werror -Wno-missing-field-initializers -UNDEBUG -g -O1 -Icsrc $(shell pkg-config --cflags jansson 2>/dev/null)
LIBS_CORE = $(shell pkg-config --libs jansson 2>/dev/null || echo -ljansson) -lz -lm -lpthread
CORE_SRC = $(wildcard csrc/core/*.c)
CTESTS = $(patsubst tests/c/%.c,tests/c/bin/%,$(wildcard tests/c/test_*.c))
CTESTS_ASAN = $(patsubst tests/c/%.c,tests/c/bin/asan_%,$(wildcard tests/c/test_*.c))

.PHONY: setup build test asan ctest ctest-asan bench demo clean

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

ctest: $(CTESTS)
	@for t in $(CTESTS); do $$t || exit 1; done
ctest-asan: $(CTESTS_ASAN)
	@for t in $(CTESTS_ASAN); do ASAN_OPTIONS=detect_leaks=1 $$t || exit 1; done

clean:
	rm -rf build tests/c/bin tests/fuzz/bin mlutils/*.so
