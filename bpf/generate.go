// Package bpf holds the BPF programs of the kernel datapath and their Go bindings, which bpf2go
// generates from the C sources. The generated files are committed, so building sockrelay needs no clang;
// `make generate` regenerates them and CI checks that they are current.
package bpf

//go:generate go tool bpf2go -tags linux -cc clang -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" -target bpfel -output-stem sockrelay -type control_args -type sock_info -type sock_stats Sockrelay sockrelay.c
