// The cost of one small loopback TCP send on this machine (issue 26 item 3; results in
// docs/performance.md). gcc -O2 -pthread -o sendcost loadgen/sendcost.c
//   ./sendcost SIZE CALLS NODELAY [GAP_US]: GAP_US 0 sends back to back (the reader is
//   awake); GAP_US > 0 sends one per GAP_US (busy wait), so the reader sleeps at each send.
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <pthread.h>
#include <sched.h>
#include <time.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <sys/socket.h>
static int rfd;
static void pin(int c){cpu_set_t s;CPU_ZERO(&s);CPU_SET(c,&s);pthread_setaffinity_np(pthread_self(),sizeof s,&s);}
static void *reader(void *a){pin(1);char b[65536];while(read(rfd,b,sizeof b)>0){}return 0;}
static double now(clockid_t c){struct timespec t;clock_gettime(c,&t);return t.tv_sec*1e9+t.tv_nsec;}
int main(int argc,char**argv){
  int size=argc>1?atoi(argv[1]):100; long n=argc>2?atol(argv[2]):1000000; int nodelay=argc>3?atoi(argv[3]):1;
  int l=socket(AF_INET,SOCK_STREAM,0);struct sockaddr_in a={.sin_family=AF_INET,.sin_addr.s_addr=htonl(INADDR_LOOPBACK)};
  bind(l,(void*)&a,sizeof a);listen(l,1);socklen_t al=sizeof a;getsockname(l,(void*)&a,&al);
  int s=socket(AF_INET,SOCK_STREAM,0);connect(s,(void*)&a,sizeof a);rfd=accept(l,0,0);
  int one=nodelay;setsockopt(s,IPPROTO_TCP,TCP_NODELAY,&one,sizeof one);
  pthread_t t;pthread_create(&t,0,reader,0);pin(0);
  char buf[4096];memset(buf,'x',sizeof buf);
  for(long i=0;i<n/10;i++) send(s,buf,size,0); // warm
  int gap=argc>4?atoi(argv[4]):0;
  if(!gap){
  double w0=now(CLOCK_MONOTONIC),c0=now(CLOCK_THREAD_CPUTIME_ID);
  for(long i=0;i<n;i++) if(send(s,buf,size,0)!=size){perror("send");return 1;}
  double w1=now(CLOCK_MONOTONIC),c1=now(CLOCK_THREAD_CPUTIME_ID);
  printf("size %d nodelay %d calls %ld back-to-back: wall %.0f ns/call, sender cpu %.0f ns/call\n",size,nodelay,n,(w1-w0)/n,(c1-c0)/n);
  } else {
  // one send every GAP us, so the reader is asleep at each send (as a quiet recipient is)
  double tot=0,tw=0;
  for(long i=0;i<n;i++){double t=now(CLOCK_MONOTONIC)+gap*1e3; while(now(CLOCK_MONOTONIC)<t){}
    double w0=now(CLOCK_MONOTONIC),c0=now(CLOCK_THREAD_CPUTIME_ID); if(send(s,buf,size,0)!=size){perror("send");return 1;}
    double c1=now(CLOCK_THREAD_CPUTIME_ID),w1=now(CLOCK_MONOTONIC); tot+=c1-c0; tw+=w1-w0;}
  printf("size %d nodelay %d calls %ld one per %d us (reader asleep): wall %.0f ns/call, sender cpu %.0f ns/call\n",size,nodelay,n,gap,tw/n,tot/n);
  }
  shutdown(s,SHUT_WR);pthread_join(t,0);return 0;}
