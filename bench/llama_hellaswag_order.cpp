// The order in which llama.cpp's `llama-perplexity --hellaswag` takes the items of its file: it draws
// them with std::mt19937(1) and std::uniform_int_distribution over the items left (tools/perplexity/
// perplexity.cpp, hellaswag_score), and prints only the running accuracy. Built by the compiler that
// built llama.cpp (same libstdc++), this prints the file index of each printed task, one per line, so
// bench/benchmarks.py can tell which item each of llama.cpp's answers belongs to.
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

int main(int argc, char ** argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: %s <items in the file> <tasks taken>\n", argv[0]);
        return 2;
    }
    const size_t total = std::strtoull(argv[1], nullptr, 10);
    const size_t taken = std::strtoull(argv[2], nullptr, 10);
    std::vector<size_t> left(total);
    for (size_t i = 0; i < total; i++) left[i] = i;
    std::mt19937 rng(1);
    for (size_t i = 0; i < taken && i < total; i++) {
        std::uniform_int_distribution<size_t> dist(0, left.size() - 1);
        const size_t idx = dist(rng);
        std::printf("%zu\n", left[idx]);
        left.erase(left.begin() + idx);
    }
    return 0;
}
