// Package docs holds sockrelay's user documentation, as Markdown beside this file. It has no code: its
// test checks that the links of README.md and of these pages lead somewhere.
package docs
